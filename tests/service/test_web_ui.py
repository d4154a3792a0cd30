"""The web demo page in a real browser: Debian's headless Chromium driven by Playwright, against
the real server started in a subprocess on a free port.

Chromium comes from `make browser` (scripts/install-browser.sh, run by `make test`); when it is
missing this module tries that script once, and skips loudly only when no Chromium can be had.
Screenshots of the page go to a temporary folder, so a test run leaves the checkout as it was;
`NORMSERVE_SCREENSHOTS=docs/screenshots` refreshes the committed ones.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from servers import running_server

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("NORMSERVE_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(os.environ.get("NORMSERVE_SCREENSHOTS") or tempfile.mkdtemp(prefix="normserve-screenshots-"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 30_000


def _skip_loudly(reason: str) -> None:
    message = f"WEB UI TEST SKIPPED: {reason}"
    warnings.warn(message, stacklevel=2)
    print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)
    pytest.skip(message)


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    script = ROOT / "scripts" / "install-browser.sh"
    try:
        subprocess.run(["bash", str(script)], check=False, timeout=600, env={**os.environ, "CHROMIUM": str(CHROMIUM)})
    except (OSError, subprocess.TimeoutExpired) as exc:
        _skip_loudly(f"{CHROMIUM} is missing and {script.name} failed: {exc}")
    if not CHROMIUM.exists():
        _skip_loudly(f"{CHROMIUM} is missing and could not be installed (run `make browser` as root)")


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log, env={"NORMSERVE_LOG_LEVEL": "warning"}) as running:
        yield running.base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_loudly("playwright is not installed (pip install -e '.[dev]')")
    _ensure_chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def labels(server: str) -> list[str]:
    status, meta = _get_json(f"{server}/v2/models/gncnn")
    assert status == 200, meta
    return list(meta["labels"])


@pytest.fixture(scope="module")
def fixture_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small drawn scene: sky, ground, a red box and a yellow disc (no dataset images)."""
    h, w = 72, 96
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([110, 170, 230]) * (1 - y) + np.array([200, 225, 245]) * y
    img = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 50, w, h), fill=(90, 140, 70))
    d.rectangle((20, 30, 60, 58), fill=(200, 40, 40))
    d.ellipse((66, 8, 86, 28), fill=(250, 220, 80))
    path = tmp_path_factory.mktemp("fixtures") / "scene.png"
    img.save(path)
    return path


def _shot(page: Any, name: str) -> Path:
    """A full-page screenshot, reduced to a 256-colour PNG so that it stays small enough to commit."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True, animations="disabled", caret="hide")))
    shot.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    size = path.stat().st_size
    assert size < 300_000, f"{path} is {size} bytes; keep screenshots under 300 KB"
    return path


_CANVAS_STATS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const colours = new Set();
  let opaque = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) opaque++;
    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  }
  return {width: c.width, height: c.height, opaque, colours: colours.size};
}"""


def _problems(page: Any) -> list[str]:
    """Console errors, page errors and HTTP errors of `page`, collected as it runs."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return problems


def _wait_results(page: Any) -> None:
    page.wait_for_selector("#classify-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#features-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#denoise-panel[data-state=done]", timeout=UI_TIMEOUT_MS)


@pytest.mark.e2e
def test_demo_page_desktop(browser: Any, server: str, labels: list[str], fixture_png: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors = _problems(page)
    page.goto(server + "/")
    assert page.title() == "normserve demo"

    # Models panel: names, versions, provider, and the untrained notice when the model says so.
    page.wait_for_selector("#models-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    models_text = page.inner_text("#models")
    assert "gncnn" in models_text and "in_autoencoder" in models_text
    assert "CPUExecutionProvider" in models_text
    _, meta = _get_json(f"{server}/v2/models/gncnn")
    for v in meta["versions"]:
        assert v in page.inner_text("#models tr[data-model=gncnn]")

    # Upload the fixture; wait for all three results.
    page.set_input_files("#file", str(fixture_png))
    expect(page.locator("#predictions li")).to_have_count(5, timeout=UI_TIMEOUT_MS)
    _wait_results(page)
    shown = page.locator("#predictions .bar-label").all_inner_texts()
    assert len(shown) == 5 and len(set(shown)) == 5
    assert set(shown) <= set(labels), shown
    probs = [float(t.rstrip("%")) for t in page.locator("#predictions .bar-value").all_inner_texts()]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 100 for p in probs)
    assert page.is_visible("#classify-untrained") == (not meta["trained"])
    assert "CPUExecutionProvider" in page.inner_text("#classify-model")

    # Denoised image decoded at the input's size.
    size = page.eval_on_selector("#denoised", "img => [img.naturalWidth, img.naturalHeight, img.complete]")
    assert size == [96, 72, True]

    # Three non-blank heatmaps at the pyramid's resolutions (32x32 input: strides 1, 2, 4).
    for name, side in (("P3", 32), ("P4", 16), ("P5", 8)):
        stats = page.evaluate(_CANVAS_STATS, f"heat-{name}")
        assert stats["width"] == side and stats["height"] == side, stats
        assert stats["opaque"] == side * side and stats["colours"] > 1, (name, stats)
        assert f"{name} · stride" in page.inner_text(f"#heat-{name}-caption")

    # PSNR readouts at the default σ = 15, then move the slider with the keyboard to 25.
    assert page.input_value("#sigma") == "15"
    noisy_15 = page.inner_text("#psnr-noisy")
    denoised_15 = page.inner_text("#psnr-denoised")
    assert noisy_15.endswith(" dB") and denoised_15.endswith(" dB")
    page.focus("#sigma")
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#sigma") == "25"
    assert page.inner_text("#sigma-value") == "25"
    page.wait_for_selector("#denoise-panel[data-state=done][data-sigma='25']", timeout=UI_TIMEOUT_MS)
    noisy_25 = page.inner_text("#psnr-noisy")
    assert noisy_25 != noisy_15 and float(noisy_25.split()[0]) < float(noisy_15.split()[0])
    assert page.inner_text("#psnr-denoised").endswith(" dB")

    # σ = 0: the noisy image is the original.
    page.keyboard.press("Home")
    page.wait_for_selector("#denoise-panel[data-state=done][data-sigma='0']", timeout=UI_TIMEOUT_MS)
    assert page.inner_text("#psnr-noisy") == "∞ dB"
    page.keyboard.press("End")
    page.wait_for_selector("#denoise-panel[data-state=done][data-sigma='50']", timeout=UI_TIMEOUT_MS)
    page.fill("#sigma", "25")  # fill on a range input dispatches input like a user would
    page.wait_for_selector("#denoise-panel[data-state=done][data-sigma='25']", timeout=UI_TIMEOUT_MS)

    assert page.is_hidden("#error"), page.inner_text("#error")
    assert not console_errors, console_errors
    _shot(page, "web-ui-desktop.png")
    page.close()


@pytest.mark.e2e
def test_api_error_is_shown_and_dropzone_works_with_keyboard(browser: Any, server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a PNG\n" * 4)
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    choosers: list[Any] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))  # intercept for the whole test
    page.goto(server + "/")
    page.wait_for_selector("#models-panel[data-state=done]", timeout=UI_TIMEOUT_MS)

    # Tab to the drop zone (the skip link comes first) and open the file chooser with Enter.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "dropzone":
            break
    assert page.evaluate("document.activeElement.id") == "dropzone"
    outline = page.eval_on_selector("#dropzone", "el => getComputedStyle(el).outlineStyle")
    assert outline != "none", "keyboard focus must be visible"
    # Space and Enter both open the file chooser; pick the bad file in the one from Enter.
    for key in (" ", "Enter"):
        before = len(choosers)
        page.keyboard.press(key)
        for _ in range(50):
            if len(choosers) > before:
                break
            page.wait_for_timeout(100)
        assert len(choosers) == before + 1, f"{key!r} on the drop zone opened no file chooser"
    choosers[-1].set_files(str(bad))

    error = page.locator("#error")
    error.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    text = error.inner_text()
    # The API's own message, readable: route, status and what to do.
    assert "/classify failed (HTTP 400)" in text, text
    assert "not a decodable image" in text and "send a PNG" in text, text
    assert page.get_attribute("#error", "role") == "alert"
    assert page.locator("#predictions li").count() == 0
    _shot(page, "web-ui-error.png")

    # A good sample afterwards clears the error.
    page.click(".sample >> nth=0")
    _wait_results(page)
    assert page.is_hidden("#error")

    # A large image is downscaled in the browser (at most 512 px a side) before the demo.
    big = tmp_path / "big.jpg"
    Image.new("RGB", (1200, 800), (40, 120, 200)).save(big, quality=90)
    page.set_input_files("#file", str(big))
    expect(page.locator("#image-info")).to_contain_text("1200×800 px, downscaled", timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#denoise-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    assert page.eval_on_selector("#denoised", "img => [img.naturalWidth, img.naturalHeight]") == [512, 341]
    assert page.is_hidden("#error")
    page.close()


@pytest.mark.e2e
def test_phone_width(browser: Any, server: str, labels: list[str]) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True)
    page = context.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#models-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    page.get_by_role("button", name="Car").click()
    _wait_results(page)
    assert set(page.locator("#predictions .bar-label").all_inner_texts()) <= set(labels)

    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than the phone"
    # Panels and images stack into one column.
    lefts = page.evaluate(
        "['#input-panel', '#classify-panel', '#denoise-panel', '#features-panel']"
        ".map(s => Math.round(document.querySelector(s).getBoundingClientRect().left))"
    )
    assert len(set(lefts)) == 1, lefts
    tops = page.evaluate(
        "['#original', '#noisy', '#denoised'].map(s => document.querySelector(s).getBoundingClientRect().top)"
    )
    assert tops == sorted(tops) and len(set(tops)) == 3, tops
    assert page.locator("#heat-P5").bounding_box()["width"] <= 390
    _shot(page, "web-ui-phone.png")
    context.close()


API_KEY = "demo-key-0123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with running_server(log, env={"NORMSERVE_LOG_LEVEL": "warning", "NORMSERVE_API_KEY": API_KEY}) as running:
        yield running.base_url


@pytest.mark.e2e
def test_api_key_is_asked_for_and_used(browser: Any, keyed_server: str) -> None:
    """With NORMSERVE_API_KEY set, the page still loads (metadata is open), says a key is needed
    when inference answers 401, and works once the key is entered (kept in sessionStorage)."""
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(keyed_server + "/")
    page.wait_for_selector("#models-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    assert page.is_hidden("#key-form")

    page.click(".sample >> nth=0")
    page.locator("#error").wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    assert "(HTTP 401)" in page.inner_text("#error") and "API key" in page.inner_text("#error")
    assert page.is_visible("#key-form")

    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    _wait_results(page)  # the same image, run again with the key
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.evaluate("sessionStorage.getItem('normserve.apiKey')") == API_KEY
    page.close()


def test_ui_routes_without_a_browser() -> None:
    """The page and its files are served from the package; nothing else is reachable under /static."""
    from fastapi.testclient import TestClient

    from normserve.service.app import create_app
    from normserve.service.settings import Settings

    settings = Settings(model_repository=ROOT / "model_repository", warmup=False, log_level="warning")
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for ref in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
            assert ref in page.text
            assert client.get(ref).status_code == 200, ref
        for sample in ("ship", "automobile", "frog"):
            res = client.get(f"/static/samples/{sample}.png")
            assert res.status_code == 200 and res.headers["content-type"] == "image/png"
            assert f"/static/samples/{sample}.png" in page.text
        for bad in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nope.js", "/static/samples", "/static/"):
            res = client.get(bad)
            assert res.status_code == 404 and "error" in res.json(), bad
        for bad in ("/static/app%00.js", "/static/%00", "/static/samples/car.png%00.js"):  # NUL: was a 500
            res = client.get(bad)
            assert res.status_code == 404 and "error" in res.json(), bad
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith(("/static", "/docs", "/ui")) for p in paths)
        # The API docs load their assets from this server only (the browser test checks offline).
        for page_url, assets in (
            ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
            ("/redoc", ("redoc.standalone.js",)),
        ):
            html = client.get(page_url).text
            assert "cdn" not in html.lower() and "fonts.googleapis" not in html, page_url
            for asset in assets:
                assert f"/docs-assets/{asset}" in html
                res = client.get(f"/docs-assets/{asset}")
                assert res.status_code == 200 and len(res.content) > 100_000, asset
        assert client.get("/docs-assets/../app.py").status_code == 404
        assert client.get("/docs-assets/nope.js").json()["error"]
        assert client.get("/ui/routes").json() == {
            "classifier": {"model": "gncnn", "served": True, "routes": ["/classify", "/features"]},
            "denoiser": {"model": "in_autoencoder", "served": True, "routes": ["/reconstruct"]},
        }


def _offline(page: Any) -> list[str]:
    """Abort every request that would leave this machine, as in an air-gapped cluster; returns the
    list of what was refused (it fills in as the page loads)."""
    refused: list[str] = []

    def route(r: Any) -> None:
        host = urllib.parse.urlsplit(r.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return refused


@pytest.mark.e2e
def test_api_docs_work_offline(browser: Any, server: str) -> None:
    """/docs (Swagger UI) and /redoc render their operations with every non-loopback request
    blocked: their JavaScript and CSS come from this server, not from a CDN."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = _offline(page)
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock", timeout=UI_TIMEOUT_MS)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    for path in ("/classify", "/features", "/reconstruct", "/v2/health/ready"):
        assert any(p.replace("\u200b", "") == path for p in paths), (path, paths)
    assert page.title() == "normserve - Swagger UI"
    _shot(page, "docs-offline.png")

    page.goto(server + "/redoc")
    page.get_by_text("Top-k labels with probabilities", exact=False).first.wait_for(timeout=UI_TIMEOUT_MS)
    assert refused == [], refused
    page.close()


@pytest.fixture(scope="module")
def two_class_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose repository holds only a 2-class classifier (cat, ship): no denoiser."""
    from class_subset import write_class_subset

    repo = tmp_path_factory.mktemp("two_class_repo")
    write_class_subset(repo, ROOT / "model_repository" / "gncnn" / "7", ["cat", "ship"])
    log = tmp_path_factory.mktemp("two_class") / "server.log"
    with running_server(log, "--model-repository", str(repo), env={"NORMSERVE_LOG_LEVEL": "warning"}) as running:
        yield running.base_url


@pytest.mark.e2e
def test_demo_page_shows_only_what_is_served(browser: Any, two_class_server: str) -> None:
    """With only a 2-class classifier, the page classifies with both classes (no top-5 error),
    shows the feature pyramid, leaves the denoising panel out and says the denoiser is absent."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = _problems(page)
    page.goto(two_class_server + "/")
    page.wait_for_selector("#models-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    absent = page.inner_text("#absent")
    assert "in_autoencoder" in absent and "/reconstruct" in absent, absent
    assert page.is_hidden("#denoise-panel")
    assert page.inner_text("#classify-title") == "2. Top-2 classes"
    assert page.inner_text("#features-title") == "3. Feature pyramid"

    page.get_by_role("button", name="Ship").click()
    expect(page.locator("#predictions li")).to_have_count(2, timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#features-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#classify-panel[data-state=done]", timeout=UI_TIMEOUT_MS)
    assert page.locator("#predictions .bar-label").all_inner_texts()[0] == "ship"
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.inner_text("#status").startswith("Done"), page.inner_text("#status")
    assert not problems, problems
    _shot(page, "web-ui-2class.png")
    page.close()
