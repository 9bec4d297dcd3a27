"""Compare's agreement columns and the budget sweep in headless Chromium (tiny LLaVA-1.5), on a laptop (1500x1000)
and a phone (390x844, touch): the sweep runs with its progress and Stop beside its button, then its table, its
plot (the plot's pixels: coloured lines on white) and its files; Compare's files are offered; nothing is wider
than the screen. Screenshots go to the test's tmp_path (looked at when this was written)."""

import numpy as np
import pytest

from tests.appclient import tiny_llava_app
from tests.conftest import ROOT
from tests.test_browser import ask, wait_until_textbox_is_back
from tests.test_page_layout import CLIPPED, TOO_WIDE, box, page_of  # noqa: F401

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

STATS_DONE = "() => document.querySelector('#stats').innerText.includes('first token')"
SWEEP_DONE = "() => document.querySelector('#sweep-table').innerText.includes('Budget sweep:')"


@pytest.fixture(scope="module")
def url(tiny_llava):
    with tiny_llava_app(max_new_tokens=6) as local_url:
        yield local_url


def asked(page):
    page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
    page.wait_for_selector("#textbox img", timeout=15_000)
    ask(page, "What animal is this?")
    page.wait_for_function(STATS_DONE, timeout=90_000)
    wait_until_textbox_is_back(page)


def plot_pixels(page) -> np.ndarray:
    from io import BytesIO
    from PIL import Image
    src = page.locator("#sweep-plot img").get_attribute("src")
    data = page.evaluate("async (u) => { const r = await fetch(u); const b = new Uint8Array(await r.arrayBuffer());"
                         " return Array.from(b); }", src)
    return np.asarray(Image.open(BytesIO(bytes(data))).convert("RGB"), dtype=int)


def run_sweep(page, tap: bool):
    act = (lambda loc: loc.tap()) if tap else (lambda loc: loc.click())
    act(page.get_by_role("tab", name="Compare"))
    for label in ("VisionZip", "DivPrune"):
        act(page.locator("#compare-methods label", has_text=label))
    act(page.get_by_text("Budget sweep: agreement with Full"))
    for budget in ("128", "192"):  # keep 16, 32, 64
        act(page.locator("#sweep-budgets label", has_text=budget))
    assert page.locator("#sweep-plot").bounding_box() is None and page.locator("#sweep-files").bounding_box() is None
    act(page.locator("#sweep-run"))
    # read in one go while it runs (a tiny model's sweep is quick): Stop's bottom and the progress line's top
    stop_bottom, progress_top = page.wait_for_function(
        "() => { const s = document.querySelector('#sweep-stop'), t = document.querySelector('#sweep-table');"
        " if (!s || !s.offsetParent || !/Sweep: .*of 7/.test(t.innerText)) return false;"
        " return [s.getBoundingClientRect().bottom, t.getBoundingClientRect().top]; }", timeout=60_000).json_value()
    assert 0 <= progress_top - stop_bottom < 40, (stop_bottom, progress_top)  # Stop right above its progress
    page.wait_for_function(SWEEP_DONE, timeout=180_000)
    page.wait_for_selector("#sweep-plot img", timeout=30_000)
    wait_until_textbox_is_back(page)


def check_plot(page):
    pixels = plot_pixels(page)
    assert pixels.shape[:2] == (400, 900)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 80  # matplotlib's line colours (blue, orange) on white
    assert coloured.sum() > 500


def test_sweep_and_compare_files_on_a_laptop(url, tmp_path):
    with page_of(url, 1500, 1000) as page:
        asked(page)
        run_sweep(page, tap=False)
        rows = [r.split("\t")[:2] for r in page.locator("#sweep-table tbody tr").all_inner_texts()]
        assert rows == [["Full", "all"], ["VisionZip", "16"], ["VisionZip", "32"], ["VisionZip", "64"],
                        ["DivPrune", "16"], ["DivPrune", "32"], ["DivPrune", "64"]]
        check_plot(page)
        names = page.locator("#sweep-files").inner_text().replace("\n", "")
        assert "sweep.json" in names and "sweep.csv" in names and "sweep.png" in names
        assert page.evaluate(TOO_WIDE, 0) == [] and page.evaluate(CLIPPED) == []
        page.locator("#sweep-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "sweep-desktop.png"), full_page=True)
        assert page.locator("#compare-files").bounding_box() is None  # no empty file box before a Compare
        page.locator("#compare-methods label", has_text="Full").click()
        page.locator("#compare").click()
        page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('Agreement with')",
                               timeout=120_000)
        wait_until_textbox_is_back(page)
        assert "compare.json" in page.locator("#compare-files").inner_text().replace("\n", "")
        page.screenshot(path=str(tmp_path / "compare-desktop.png"), full_page=True)


def test_sweep_on_a_phone(url, tmp_path):
    with page_of(url, 390, 844, touch=True) as page:
        asked(page)
        run_sweep(page, tap=True)
        check_plot(page)
        plot = box(page, "#sweep-plot img")
        assert plot["width"] <= 390 and plot["x"] >= 0
        assert page.evaluate(TOO_WIDE, 390) == [] and page.evaluate(CLIPPED) == []
        page.screenshot(path=str(tmp_path / "sweep-phone.png"), full_page=True)
