"""End to end: the real server on a loopback port, its page driven in headless Chromium (Playwright)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from helpers import CHROMIUM, CHROMIUM_ARGS, playwright_api, start_server, stop
from PIL import Image
from test_serve_api import CLASSES, make_tiny_run

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

K = 5


def tiles(page) -> list[dict]:
    return page.eval_on_selector_all("#results .result", """els => els.map(e => ({
        id: Number(e.dataset.id), label: e.querySelector('.label').textContent, cls: e.className,
        loaded: [...e.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)}))""")


def wait_for_images(page, timeout_ms: int = 60_000) -> None:
    """Until every result image has finished loading (decoded, non-empty) or failed: a busy machine
    can keep an image request open past a "network idle" moment; a failed one still fails the
    ``loaded`` check after this."""
    page.wait_for_function("""() => [...document.querySelectorAll('#results .result img')]
        .every(i => i.complete)""", timeout=timeout_ms)


def test_page_upload_and_random_item(tmp_path):
    sync_playwright, expect = playwright_api()
    run_dir, index_dir = make_tiny_run(tmp_path / "data")
    query_file = tmp_path / "query.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(query_file)
    proc, base = start_server(index_dir, run_dir, tmp_path / "server.log")
    try:
        expected = httpx.post(f"{base}/api/search", files={"image": ("query.png", query_file.read_bytes(), "image/png")},
                              data={"k": str(K)}, timeout=30).json()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(base + "/")
                expect(page.locator("#info")).to_contain_text("-bit codes")
                page.select_option("#k", str(K))
                page.set_input_files("#file", str(query_file))
                expect(page.locator("#results .result")).to_have_count(K)
                page.wait_for_load_state("networkidle")
                wait_for_images(page)
                shown = tiles(page)
                assert [t["id"] for t in shown] == [r["id"] for r in expected["results"]]
                assert all(t["loaded"] for t in shown)
                assert not any("correct" in t["cls"] or "wrong" in t["cls"] for t in shown)  # label unknown
                shot = tmp_path / "upload.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert Image.open(shot).size[0] >= 1100

                page.click("#random")
                expect(page.locator("#results .result.correct, #results .result.wrong")).to_have_count(K)
                caption = page.text_content("#query-caption")
                assert caption.startswith("database item ")
                query_label = caption.rsplit("label ", 1)[1]
                assert query_label in CLASSES
                marked = tiles(page)
                assert len(marked) == K
                for t in marked:
                    assert ("correct" in t["cls"]) == (t["label"] == query_label)
                page.screenshot(path=str(tmp_path / "random.png"), full_page=True)
                assert (tmp_path / "random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert errors == []
            finally:
                browser.close()
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    finally:
        stop(proc)
