"""End to end in headless Chromium (Playwright): add an image through the page with the token,
find it by searching with the same image, remove it; a read-only server shows no write controls."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import tiny_digits_run, CHROMIUM, CHROMIUM_ARGS, playwright_api, stop

from deephash.retrieval.index import HashIndex

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

BITS = 12
CLASSES = [str(d) for d in range(10)]
TOKEN = "page-token-7d1e"


def tiny_run(root: Path) -> tuple[Path, Path]:
    """A tiny CNN on 8x8 digits (hash bias centred so codes vary) and an index over its train split."""
    return tiny_digits_run(root, BITS, centred=True)[:2]


def start_server(index_dir: Path, run_dir: Path, log: Path, token_file: Path | None) -> tuple[subprocess.Popen, str]:
    return helpers.start_server(index_dir, run_dir, log, *(["--token-file", str(token_file)] if token_file else []))


def result_ids(page) -> list[int]:
    return page.eval_on_selector_all("#results .result", "els => els.map(e => Number(e.dataset.id))")


def test_page_adds_finds_and_removes_an_image(tmp_path):
    sync_playwright, expect = playwright_api()
    run_dir, index_dir = tiny_run(tmp_path / "data")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    pixels = np.random.default_rng(11).integers(0, 256, (8, 8), dtype=np.uint8)
    image_file = tmp_path / "new-item.png"
    Image.fromarray(pixels).save(image_file)
    before = HashIndex.load(index_dir)
    new_id = int(before.ids.max()) + 1
    log = tmp_path / "server.log"

    proc, base = start_server(index_dir, run_dir, log, token_file)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(base + "/")
                expect(page.locator("#info")).to_contain_text("accepts adds and removes")
                expect(page.locator("#writes")).to_be_visible()
                page.select_option("#k", "100")
                page.set_input_files("#file", str(image_file))
                expect(page.locator("#results .result")).to_have_count(100)
                assert new_id not in result_ids(page)

                page.click("#add")  # no token yet: refused by the page itself
                expect(page.locator("#write-status")).to_have_text("enter the write token first")
                page.fill("#token", "not-the-token")
                page.click("#add")
                expect(page.locator("#write-status")).to_contain_text("error 401")
                page.fill("#token", TOKEN)
                page.fill("#add-label", "7")
                page.click("#add")
                expect(page.locator("#write-status")).to_have_text(f"added as item {new_id}")
                expect(page.locator(f'#results .result[data-id="{new_id}"]')).to_have_count(1)
                tile = page.locator(f'#results .result[data-id="{new_id}"]')
                expect(tile.locator(".label")).to_have_text("7")
                expect(tile.locator(".distance")).to_contain_text("d=0")
                page.wait_for_load_state("networkidle")
                assert tile.locator("img").evaluate("i => i.complete && i.naturalWidth === 8")
                expect(page.locator("#info")).to_contain_text(f"{len(before) + 1} items")
                page.screenshot(path=str(tmp_path / "added.png"), full_page=True)

                tile.locator("button.remove").click()
                expect(page.locator("#write-status")).to_have_text(f"removed item {new_id}")
                expect(page.locator(f'#results .result[data-id="{new_id}"]')).to_have_count(0)
                expect(page.locator("#info")).to_contain_text(f"{len(before)} items")
                assert errors == []
            finally:
                browser.close()
        assert httpx.post(f"{base}/api/search", json={"id": new_id, "k": 1}, timeout=10).status_code == 404
    finally:
        stop(proc)
    after = HashIndex.load(index_dir)
    assert after.ids.tolist() == before.ids.tolist() and after.journal_seq == 2

    proc, base = start_server(index_dir, run_dir, log, None)  # read-only: no write controls
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(base + "/")
                expect(page.locator("#info")).to_contain_text("-bit codes")
                expect(page.locator("#writes")).to_be_hidden()
                page.set_input_files("#file", str(image_file))
                expect(page.locator("#results .result")).to_have_count(10)
                expect(page.locator("#results button.remove")).to_have_count(0)
            finally:
                browser.close()
    finally:
        stop(proc)
