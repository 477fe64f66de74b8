// Swagger UI on this server's /openapi.json, from files this server ships (no CDN): the same
// settings FastAPI's own /docs uses, in a file because the page forbids inline script.
"use strict";

window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
});
