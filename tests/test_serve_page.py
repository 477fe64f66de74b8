"""The web page at ``/`` and the API documentation at ``/docs``.

Over HTTP: the page and its files are served from the package without a key, under a strict
Content-Security-Policy, with nothing from elsewhere and no inline script; ``/openapi.json``
describes the real ``/predict`` contract (the fields the page sends, the README's fields, this
server's defaults, the answers and the error body the server really sends).

In a real browser (Chromium through selenium; skipped with the reason where Chromium or its
driver is missing): a ``cvgen serve`` process on the tiny model with an API key; the page asks
for the key, a photo is uploaded, a look and a framing picked, the portrait generated and
downloaded, then a text file renamed ``.jpg`` gets the server's message next to the photo.
Screenshots at desktop and phone width go to ``build/screenshots/`` (``$CVGEN_SCREENSHOTS``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cvgen.portrait import FRAMINGS
from cvgen.serve.config import ServeConfig
from cvgen.serve.openapi import ErrorBody, PortraitJSON
from cvgen.serve.page import CSP, STATIC
from cvgen.serve.schema import GenParams
from cvgen.serve.server import build_server
from tests.test_serve_process import free_port, wait_healthy

KEY = "page-test-key"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("CVGEN_SCREENSHOTS") or ROOT / "build" / "screenshots")
TESTIDS = ("photo", "look", "framing", "strength", "keep-face", "generate", "result", "download")


@pytest.fixture(scope="module")
def cfg(tiny_model: Path) -> ServeConfig:
    return ServeConfig(base=str(tiny_model), device="cpu", default_steps=2, max_steps=8)


@pytest.fixture(scope="module")
def app_client(cfg: ServeConfig) -> TestClient:
    """The server's routes without its model worker and lifespan (the page, docs and schema
    need neither; /predict answers its 4xx before any queue)."""
    return TestClient(build_server(cfg, api_key=KEY).app)


# --- over HTTP ------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] == "script":
            self.script_text += data.strip()


def test_page_is_served_without_a_key_under_a_strict_csp(app_client: TestClient) -> None:
    r = app_client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert set(directives["img-src"].split()) == {"'self'", "blob:", "data:"}
    assert r.headers["x-content-type-options"] == "nosniff"
    page = _Tags()
    page.feed(r.text)
    # no inline script or style, no event-handler attributes: the CSP would block them
    assert page.script_text == ""
    for tag, attrs in page.tags:
        assert "style" not in attrs and not any(a.startswith("on") for a in attrs), (tag, attrs)
    scripts = [a["src"] for t, a in page.tags if t == "script"]
    styles = [a["href"] for t, a in page.tags if t == "link" and a.get("rel") == "stylesheet"]
    assert scripts == ["static/page.js"] and styles == ["static/page.css"]
    for path in scripts + styles + ["static/favicon.svg"]:
        asset = app_client.get("/" + path)
        assert asset.status_code == 200 and asset.headers["x-content-type-options"] == "nosniff"
    testids = {a.get("data-testid") for _, a in page.tags} - {None}
    assert testids == {*TESTIDS, "error"}
    # every control is labelled
    ids = {a["id"] for t, a in page.tags if t in ("input", "select") and a.get("id")}
    labelled = {a.get("for") for t, a in page.tags if t == "label"}
    assert ids <= labelled, ids - labelled
    # the server's defaults reach the page
    assert 'data-default-keep-face="true"' in r.text and 'data-default-framing="square"' in r.text


def test_nothing_is_loaded_from_elsewhere() -> None:
    """No URL to another host in the page's files (fonts, scripts, images: all local)."""
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", text) == [], f.name


def test_docs_are_swagger_ui_from_the_package(app_client: TestClient) -> None:
    r = app_client.get("/docs")
    assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    page = _Tags()
    page.feed(r.text)
    assert page.script_text == ""
    for t, a in page.tags:
        if t in ("script", "link"):
            src = a.get("src") or a.get("href") or ""
            assert src.startswith("static/"), src
            assert app_client.get("/" + src).status_code == 200, src
    bundle = app_client.get("/static/swagger/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text[:2000]


def _predict_op(client: TestClient) -> dict[str, Any]:
    doc = client.get("/openapi.json").json()
    # every reference resolves within the document (Swagger UI shows an error box otherwise)
    for ref in re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(doc)):
        node = doc
        for part in ref.split("/"):
            node = node[part]
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["APIKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    return doc["paths"]["/predict"]["post"]


def test_openapi_describes_the_request_the_server_reads(
    app_client: TestClient, cfg: ServeConfig
) -> None:
    op = _predict_op(app_client)
    content = op["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]["properties"]
    body = content["application/json"]["schema"]["properties"]
    params = set(GenParams.model_fields)
    assert set(form) == params | {"image", "image_url"}
    assert set(body) == params | {"image_b64", "image_url"}
    assert form["image"]["format"] == "binary"
    # this server's defaults and choices
    assert form["strength"]["default"] == cfg.default_strength
    assert form["steps"]["default"] == cfg.default_steps and form["steps"]["minimum"] == 1
    assert form["keep_face"] == {**form["keep_face"], "type": "boolean", "default": True}
    assert form["framing"]["enum"] == list(FRAMINGS)
    assert "corporate" in form["look"]["enum"]
    # the README's fields table names the same fields
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| field | what | default |") :].split("\n\n", 1)[0]
    documented = set(
        re.findall(r"`([a-z_]+)`", "\n".join(ln.split("|")[1] for ln in table.splitlines()[2:]))
    )
    assert documented == params
    # the fields the page sends are fields of the contract
    js = (STATIC / "page.js").read_text(encoding="utf-8")
    sent = set(re.findall(r'form\.append\("([a-z_]+)"', js))
    assert sent and sent <= set(form), sent - set(form)
    assert {"image", "look", "framing", "strength", "keep_face", "seed"} <= sent


def test_openapi_error_and_answer_models_are_what_the_server_sends(
    app_client: TestClient, portraits: dict[str, bytes]
) -> None:
    op = _predict_op(app_client)
    components = app_client.get("/openapi.json").json()["components"]["schemas"]
    for status in ("400", "401", "413", "422", "504"):
        schema = op["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    assert components["ErrorBody"] == ErrorBody.model_json_schema()
    answer = op["responses"]["200"]["content"]
    assert {"image/jpeg", "image/png", "application/json"} <= set(answer)
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/PortraitJSON"}
    assert set(components["PortraitJSON"]["properties"]) == set(PortraitJSON.model_fields)
    assert "X-Seed" in op["responses"]["200"]["headers"]
    # the server's own errors fit the documented body exactly (extra keys are refused)
    for r in (
        app_client.post("/predict", files={"image": ("p.jpg", b"x")}),  # no key: 401
        app_client.post(
            "/predict",
            files={"image": ("p.jpg", b"not an image")},
            data={"look": "corporate"},
            headers={"X-API-Key": KEY},
        ),
        app_client.post("/predict", data={"look": "nope"}, headers={"X-API-Key": KEY}),
    ):
        assert r.status_code in (401, 422)
        ErrorBody.model_validate(r.json(), strict=True)


def test_docs_can_be_switched_off(cfg: ServeConfig) -> None:
    off = build_server(cfg.model_copy(update={"docs": False}), api_key=None)
    c = TestClient(off.app)
    if True:
        assert c.get("/docs").status_code == 404
        assert c.get("/openapi.json").status_code == 404
        assert c.get("/").status_code == 200  # the page stays
        assert 'data-docs="false"' in c.get("/").text


# --- in a real browser ----------------------------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _browser_skip() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if _chromium() is None:
        return "Chromium or chromedriver not found (apt-get install chromium chromium-driver)"
    return None


browser_test = pytest.mark.skipif(_browser_skip() is not None, reason=_browser_skip() or "")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = _chromium()
    assert found is not None
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root in CI containers
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    driver.set_page_load_timeout(60)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def live_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``cvgen serve`` on the tiny model with an API key: its base URL."""
    work = tmp_path_factory.mktemp("page-serve")
    port = free_port()
    (work / "serve.yaml").write_text(
        f"base: {tiny_model}\ndevice: cpu\ndefault_steps: 2\nmax_steps: 8\nwarmup: false\n"
        "host: 127.0.0.1\n"
    )
    env = {**os.environ, "CVGEN_API_KEY": KEY, "PORT": str(port)}
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cvgen.cli", "serve", "--config", "serve.yaml"],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as c:
            wait_healthy(c, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _by(driver: Any, testid: str) -> Any:
    return driver.find_element("css selector", f'[data-testid="{testid}"]')


def _wait(driver: Any, check: Any, what: str, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: check(d), message=what
    )


def _csp_violations(driver: Any) -> list[str]:
    logs = driver.get_log("browser")
    return [e["message"] for e in logs if "Content Security Policy" in e["message"]]


def _screenshot(driver: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    driver.save_screenshot(str(path))
    return path


def _phone(driver: Any, on: bool) -> None:
    if on:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 360, "height": 780, "deviceScaleFactor": 1, "mobile": True},
        )
    else:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _full_page(driver: Any, name: str, width: int) -> Path:
    """A screenshot of the whole page at ``width`` px (the viewport grown to its height)."""

    def viewport(height: int) -> None:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500},
        )

    viewport(800)
    height = driver.execute_script("window.scrollTo(0, 0); return document.body.scrollHeight")
    viewport(int(height))
    try:
        return _screenshot(driver, name)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _tab_order(driver: Any, stops: int) -> list[str]:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.querySelector('.skip').focus()")  # the first stop
    order = ["skip"]
    for _ in range(stops):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        active = driver.switch_to.active_element
        name = active.get_attribute("data-testid") or active.get_attribute("id") or active.tag_name
        if name == "body":  # past the last control
            break
        outline = active.value_of_css_property("outline-style")
        assert outline != "none", f"{name} shows no focus outline"
        order.append(name)
    return order


@browser_test
def test_page_in_chromium_key_upload_generate_download_and_errors(
    browser: Any,
    live_server: str,
    cfg: ServeConfig,
    portraits: dict[str, bytes],
    downloads: Path,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(live_server + "/")
    # the server has a key: the page asks for it; a wrong one gets the server's words beside it
    key = _wait(
        d,
        lambda d: (
            d.find_element("id", "api-key").is_displayed() and d.find_element("id", "api-key")
        ),
        "key form",
    )
    key.send_keys("wrong-key")
    key.submit()
    error = _by(d, "error")
    _wait(d, lambda d: error.is_displayed(), "the key error")
    assert "missing or wrong API key" in error.text
    assert error.find_element("xpath", "..").get_attribute("id") == "key-field"
    key = d.find_element("id", "api-key")
    key.send_keys(KEY)
    key.submit()
    look = _by(d, "look")
    _wait(d, lambda d: len(Select(look).options) >= 5, "the looks from GET /looks")
    assert not d.find_element("id", "key-form").is_displayed() and not error.is_displayed()
    assert d.execute_script("return sessionStorage.getItem('cvgen-api-key')") == KEY

    # keyboard: the controls in reading order, each with a visible focus ring
    order = _tab_order(d, 12)
    wanted = ["photo", "look", "framing", "strength", "keep-face", "generate"]
    assert [s for s in order if s in wanted] == wanted, order

    # photo -> preview -> look, framing, strength, keep-face -> generate
    photo = tmp_path / "portrait.jpg"
    photo.write_bytes(portraits["collins"])
    _by(d, "photo").send_keys(str(photo))
    _wait(
        d,
        lambda d: d.execute_script("return document.getElementById('preview').naturalWidth > 0"),
        "the preview",
    )
    Select(look).select_by_value("studio-white")
    Select(_by(d, "framing")).select_by_value("4:5")
    d.execute_script(
        "const s = arguments[0]; s.value = '0.5'; s.dispatchEvent(new Event('input'))",
        _by(d, "strength"),
    )
    assert d.find_element("id", "strength-value").text == "50 %"
    assert _by(d, "keep-face").is_selected()
    generate = _by(d, "generate")
    generate.click()
    assert not generate.is_enabled()  # working: it cannot be pressed twice
    _wait(d, lambda d: re.search(r"\d+\.\d s", generate.text), "the elapsed time")
    result = _by(d, "result")
    _wait(
        d,
        lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", result
        ),
        "the result image",
    )
    size = d.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", result
    )
    assert tuple(size) == cfg.framed_size("4:5")  # the framing's size
    assert generate.is_enabled() and "Done in" in d.find_element("id", "status").text
    assert "studio" in result.get_attribute("alt").lower()

    # download: a JPEG with a sensible name, the image shown
    link = _by(d, "download")
    name = link.get_attribute("download")
    assert re.fullmatch(r"cv-portrait-studio-white-4x5-seed\d+\.jpg", name), name
    link.click()
    target = downloads / name
    _wait(d, lambda d: target.is_file() and target.stat().st_size > 0, "the download", 30)
    with Image.open(target) as img:
        assert img.format == "JPEG" and img.size == cfg.framed_size("4:5")
    _screenshot(d, "page-desktop.png")
    _full_page(d, "page-desktop-full.png", 1280)

    # at a phone's width nothing overflows sideways
    _phone(d, True)
    try:
        assert d.execute_script("return document.documentElement.scrollWidth") <= 360
        _full_page(d, "page-phone.png", 360)
    finally:
        _phone(d, False)

    # try again: a new seed, the same settings
    first_seed = name.rsplit("seed", 1)[1]
    d.find_element("id", "again").click()
    _wait(d, lambda d: _by(d, "download").get_attribute("download") != name, "a second portrait")
    assert _by(d, "download").get_attribute("download").rsplit("seed", 1)[1] != first_seed

    # a text file renamed .jpg: the server's words next to the photo, nothing else lost
    fake = tmp_path / "notes.jpg"
    fake.write_bytes(b"these are my notes, not a photo\n")
    with httpx.Client(base_url=live_server, trust_env=False) as c:
        expected = c.post(
            "/predict",
            files={"image": ("notes.jpg", fake.read_bytes(), "image/jpeg")},
            data={"look": "studio-white"},
            headers={"X-API-Key": KEY},
        ).json()
        answer = c.post(
            "/predict",
            files={"image": ("p.jpg", portraits["collins"], "image/jpeg")},
            data={"look": "corporate", "framing": "3:4"},
            headers={"X-API-Key": KEY, "Accept": "application/json"},
        )
    assert expected["field"] == "image"
    PortraitJSON.model_validate(answer.json(), strict=True)  # the documented JSON answer
    _by(d, "photo").send_keys(str(fake))
    generate.click()
    _wait(d, lambda d: error.is_displayed(), "the error")
    words = expected["detail"].removeprefix("image: ")
    assert words[:1].upper() + words[1:] in error.text
    assert error.find_element("xpath", "..").get_attribute("id") == "photo-field"
    assert _by(d, "photo").get_attribute("aria-invalid") == "true"
    assert Select(look).first_selected_option.get_attribute("value") == "studio-white"
    assert Select(_by(d, "framing")).first_selected_option.get_attribute("value") == "4:5"
    assert _by(d, "result").is_displayed()  # the last portrait stays
    _full_page(d, "page-error-phone.png", 360)

    # a photo without a face, with keep-face on: the server's reason, in the page's words
    blank = tmp_path / "wall.jpg"
    Image.new("RGB", (96, 128), (128, 128, 128)).save(blank)
    _by(d, "photo").send_keys(str(blank))
    assert not error.is_displayed()  # a new photo clears the photo's error
    generate.click()
    _wait(d, lambda d: error.is_displayed(), "the no-face error")
    assert "No face found in the photo" in error.text
    assert "turn off \u201cKeep my face as it is\u201d" in error.text
    assert error.find_element("xpath", "..").get_attribute("id") == "photo-field"
    assert _csp_violations(d) == []


@browser_test
def test_docs_in_chromium_render_offline_under_the_csp(browser: Any, live_server: str) -> None:
    d = browser
    d.get(live_server + "/docs")
    _wait(
        d,
        lambda d: any(
            "/predict" in e.text for e in d.find_elements("css selector", ".opblock-summary-path")
        ),
        "Swagger UI listing POST /predict",
        60,
    )
    d.find_element("css selector", ".opblock-post .opblock-summary").click()  # resolves $refs
    _wait(d, lambda d: d.find_elements("css selector", ".opblock-post .responses-table"), "answers")
    assert d.find_elements("css selector", ".errors-wrapper") == []  # no resolver errors
    origins = d.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) == {live_server}
    assert _csp_violations(d) == []


@browser_test
def test_page_in_chromium_without_a_key_never_asks_for_one(browser: Any, cfg: ServeConfig) -> None:
    """A server without an API key: the page loads the looks at once (the page, /looks and
    /loras need no model worker, so an in-process server without one will do)."""
    import uvicorn
    from selenium.webdriver.support.ui import Select

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_server(cfg, api_key=None).app, port=port, lifespan="off", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        d = browser
        d.get(f"http://127.0.0.1:{port}/")
        d.execute_script("sessionStorage.clear()")
        d.refresh()
        look = _by(d, "look")
        _wait(d, lambda d: len(Select(look).options) >= 5, "the looks", 30)
        assert not d.find_element("id", "key-form").is_displayed()
        assert not d.find_element("id", "change-key").is_displayed()
        # Generate without a photo: said next to the photo control
        _by(d, "generate").click()
        error = _by(d, "error")
        assert error.is_displayed() and "Choose a photo" in error.text
        assert error.find_element("xpath", "..").get_attribute("id") == "photo-field"
        assert (
            json.loads(d.execute_script("return JSON.stringify(Object.keys(sessionStorage))")) == []
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_screenshot_in_the_readme_is_small() -> None:
    png = ROOT / "docs" / "page.png"
    assert png.is_file() and png.stat().st_size < 150_000
    with Image.open(io.BytesIO(png.read_bytes())) as img:
        assert img.format == "PNG"
    assert "docs/page.png" in (ROOT / "README.md").read_text(encoding="utf-8")
