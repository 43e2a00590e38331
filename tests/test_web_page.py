"""The web page at `/`, in headless Chromium (Debian's /usr/bin/chromium driven by Playwright) as a person uses
it: pick files, drop a file, see each image with its top classes as bars, and a readable error for a bad file."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from test_gateway_servers import Gateway, ModelServer, cifar_images, png_bytes

from client import contract

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, exported_model):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM} (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("web")
    base = tmp / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    server = ModelServer(base, None)
    server.start()
    gw = Gateway({"GATEWAY_MODEL_SERVER": server.target})
    gw.start(tmp)
    yield gw
    gw.stop()
    server.stop()


@pytest.fixture(scope="module")
def page(gateway):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(gateway.url + "/")
        page.errors = errors
        yield page
        browser.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory, cifar_archive):
    tmp = tmp_path_factory.mktemp("upload")
    images, _ = cifar_images(cifar_archive, 2)
    paths = []
    for i, img in enumerate(images):
        path = tmp / f"photo{i}.png"
        path.write_bytes(png_bytes(img))
        paths.append(path)
    bad = tmp / "notes.png"
    bad.write_bytes(b"this is a text file with an image name")
    return paths, bad


def test_page_shows_model_status(page):
    page.wait_for_function("document.getElementById('status').textContent.includes('v1')", timeout=10_000)
    assert "cifar10" in page.text_content("#status")


def test_pick_files_shows_bars_and_errors(page, files):
    good, bad = files
    page.set_input_files("#files", [*good, bad])
    page.wait_for_function("document.querySelectorAll('.card.done, .card.failed').length === 3", timeout=15_000)
    done = page.query_selector_all(".card.done")
    assert len(done) == 2
    for card in done:
        assert card.query_selector(".name").text_content().startswith("photo")
        bars = card.query_selector_all(".bar")
        assert len(bars) == 5  # the page asks for the top 5
        labels = [b.query_selector(".label").text_content() for b in bars]
        assert set(labels) <= set(contract.CLASS_NAMES) and len(set(labels)) == 5
        widths = [float(b.query_selector(".fill").evaluate("e => e.style.width").rstrip("%")) for b in bars]
        assert widths == sorted(widths, reverse=True) and 0 < widths[0] <= 100
        img = card.query_selector("img")
        assert img.evaluate("e => e.complete && e.naturalWidth") == 32
        assert "model version 1" in card.text_content()
    failed = page.query_selector(".card.failed")
    assert "notes.png" in failed.text_content()
    assert "not an image" in failed.query_selector(".error").text_content()
    assert page.errors == []


def test_drop_a_file(page, files):
    page.click("#clear")
    data = base64.b64encode(files[0][1].read_bytes()).decode()
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        return dt;
    }""", data)
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    assert "over" in page.get_attribute("#drop", "class")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector(".card.done", timeout=10_000)
    card = page.query_selector(".card.done")
    assert card.query_selector(".name").text_content() == "dropped.png"
    assert len(card.query_selector_all(".bar")) == 5
    assert "over" not in (page.get_attribute("#drop", "class") or "")
    assert page.errors == []
