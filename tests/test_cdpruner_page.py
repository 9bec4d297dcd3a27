"""CDPruner in the app, in headless Chromium (laptop 1500x1000, tiny LLaVA-1.5: CLIP's tiny text tower): chosen in
the method list, the map's caption names the question it selected for, and a second question selects again (the
caption and the kept map change, the stats say so); the kept map's pixels: patches not sent are faded to white.
Screenshots go to the test's tmp_path (looked at when this was written)."""

import numpy as np
import pytest

from tests.appclient import tiny_llava_app
from tests.conftest import ROOT
from tests.test_browser import ask, wait_until_textbox_is_back
from tests.test_page_layout import map_picture, page_of

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

STATS_DONE = "() => document.querySelector('#stats').innerText.includes('first token')"
Q1, Q2 = "What animal is this?", "Is there anything on the left edge?"


@pytest.fixture(scope="module")
def url(tiny_llava):
    with tiny_llava_app(max_new_tokens=8) as local_url:
        yield local_url


def caption_has(page, text: str):
    page.wait_for_function("(t) => document.querySelector('#caption').innerText.includes(t)", arg=text,
                           timeout=60_000)


def test_cdpruner_selects_again_for_each_question(url, tmp_path):
    with page_of(url, 1500, 1000) as page:
        page.locator("#method label", has_text="CDPruner").click()
        assert page.locator("#method label", has_text="CDPruner").locator("input").is_checked()
        page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
        page.wait_for_selector("#textbox img", timeout=15_000)
        ask(page, Q1)
        page.wait_for_function(STATS_DONE, timeout=90_000)
        wait_until_textbox_is_back(page)
        caption_has(page, f"CDPruner for “{Q1}”")
        assert "selected for it" in page.locator("#stats").inner_text()
        first = np.asarray(map_picture(page), dtype=int)
        page.screenshot(path=str(tmp_path / "cdpruner-q1.png"))
        ask(page, Q2)
        caption_has(page, f"CDPruner for “{Q2}”")
        page.wait_for_function(STATS_DONE, timeout=90_000)
        wait_until_textbox_is_back(page)
        second = np.asarray(map_picture(page), dtype=int)
        page.screenshot(path=str(tmp_path / "cdpruner-q2.png"))
    assert first.shape == second.shape and np.abs(first - second).max() > 64  # another kept set, drawn
    # 64 of 576 patches sent: most of the photo faded toward white (the photo itself has almost no such pixel)
    light = (first.min(axis=-1) > 180).mean()
    assert light > 0.5, light
