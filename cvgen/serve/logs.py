"""Logging of ``cvgen serve``, set up the same way in each of its processes.

LitServe starts the inference worker with ``spawn``: the worker inherits the server's stdout and
stderr but not its logging set-up, so the worker calls :func:`configure_logging` too (from
``Img2ImgAPI.setup``) and its lines ("model loaded", speed levers, warm-up) reach the output.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "cvgen.serve.access"


def configure_logging(level: str) -> None:
    """cvgen's lines to stderr at ``level``, and the JSON access lines (one per request) to
    stdout as they are; a second call in the same process changes nothing."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level.upper(), format=FORMAT)
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the line is JSON already
        access.addHandler(handler)
        access.propagate = False
