"""Issue 37's page items, in real headless Chromium on a touch phone (390x844) and a laptop (1500x1000), from
bounding boxes, the pixels of the map as the page shows it and the readout's text:

- the map is drawn for the space the page gives it: on a phone the tiles go under the whole image, the map is
  as wide as its column and its text shows at least 11 px tall (measured from the ink of its legend and
  title); with 5 crops the Groups legend leaves the photo most of the picture; no fullscreen button (the
  readout under the map would not show there); the image picker is apart from the views, named;
- a readout belongs to the image the map shows (cleared by a message with a new image);
- Manual's first pick keeps the map still;
- the random-weights banner shows for a tiny model named on the command line (the README's SGL demo);
- the KV row says how many prompt tokens came from the cache;
- phone Compare: one map per row as wide as the column, the overlap table within the screen, no inner scroll
  box; after an example the photo and its question stay in the chat's first screen while the answer streams.
Screenshots go to the test's tmp_path (looked at when this was written)."""

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.test_browser import ask, wait_until_textbox_is_back
from tests.test_page_layout import CLIPPED, TOO_WIDE, box, inside, map_picture, page_of

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

STATS_DONE = "() => document.querySelector('#stats').innerText.includes('first token')"


@pytest.fixture(scope="module")
def url(tiny_ov, tiny_ov_large):
    import app
    # the README's offline SGL command: `--model tiny-ov-large --small-model tiny-ov-small`
    vlm, small, banner = app.load_models("tiny-ov-large", "tiny-ov-small", dtype="float32")
    demo = app.build_demo(vlm, banner=banner, max_new_tokens=64, small=small, max_tiles=4)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", **app.launch_options())
    yield local_url
    demo.close()


@pytest.fixture(scope="module")
def panorama(tmp_path_factory):
    """Three copies of the cat side by side (1353x300): 4 tiles and the whole image, 5 crops."""
    cat = Image.open(ROOT / "assets" / "chelsea.png").convert("RGB")
    pano = Image.new("RGB", (cat.width * 3, cat.height))
    for i in range(3):
        pano.paste(cat, (i * cat.width, 0))
    path = tmp_path_factory.mktemp("pano") / "panorama.png"
    pano.save(path)
    return str(path)


def shown_scale(page, picture) -> float:
    """Page pixels per picture pixel of the map as shown (fitted inside its box)."""
    b = page.locator("#map img").bounding_box()
    return min(b["width"] / picture.width, b["height"] / picture.height)


def runs(mask) -> list:
    """(start, stop) of each run of True in a 1-d mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def photo_rows(picture):
    """Rows of the picture that are mostly photo (not the white of titles and legends)."""
    a = np.asarray(picture, dtype=int)
    return (a < 235).any(-1).mean(1) > 0.6


def ink_heights(picture, rows) -> list:
    """Heights, in picture pixels, of the text lines within `rows` (a slice): runs of rows holding dark ink
    (the map's text colour is (40, 40, 40); swatches and rings are coloured, never that dark)."""
    a = np.asarray(picture, dtype=int)[rows]
    return [stop - start for start, stop in runs(((a < 110).all(-1)).any(1))]


def ink_per_px(text: str) -> float:
    """Ink height of `text` drawn in the map's font, per pixel of font size (measured at 100 px)."""
    from PIL import ImageDraw
    from pipeline.heatmap import TEXT, font
    sheet = Image.new("RGB", (6000, 300), (255, 255, 255))
    ImageDraw.Draw(sheet).text((10, 10), text, fill=TEXT, font=font(100))
    return max(ink_heights(sheet, slice(None))) / 100


def legend_text_px(page, picture) -> float:
    """The font size of the legend under the photo as shown, in page pixels: its tallest line's ink (a line
    with parentheses or descenders: every legend has one) over the ink per pixel of such a line."""
    last_photo_row = np.flatnonzero(photo_rows(picture))[-1]
    heights = ink_heights(picture, slice(last_photo_row + 1, None))
    assert heights, "no legend under the map"
    return max(heights) * shown_scale(page, picture) / ink_per_px("faded: (merged or dropped) patches")


def title_text_px(page, picture) -> float:
    """The font size of the title over the first panel ("whole image") as shown, in page pixels."""
    first_photo_row = np.flatnonzero(photo_rows(picture))[0]
    return max(ink_heights(picture, slice(0, first_photo_row))) * shown_scale(page, picture) / ink_per_px("whole image")


def switch_view(page, label):
    old = page.locator("#map img").get_attribute("src")
    page.locator("#view label", has_text=label).click()
    page.wait_for_function("(old) => document.querySelector('#map img').src !== old", arg=old, timeout=30_000)


def test_the_map_on_a_phone(url, panorama, tmp_path):
    with page_of(url, 390, 844, touch=True) as page:
        banner = page.locator("#offline-banner")  # item 4: the README's tiny SGL demo says why answers are random
        assert "random weights" in banner.inner_text() and "tiny-ov-large" in banner.inner_text()
        assert float(banner.locator("p").first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) >= 11
        page.set_input_files("#textbox input[type=file]", panorama)
        page.wait_for_selector("#textbox img", timeout=15_000)
        ask(page, "What is in this panorama?")
        page.wait_for_function(STATS_DONE, timeout=90_000)
        wait_until_textbox_is_back(page)
        assert "x 5 crops" in page.locator("#caption").inner_text()
        # item 5: as wide as the column, the tiles under the whole image (a canvas about as tall as wide; side by
        # side it would be 6 times wider than tall), text at least 11 px as shown
        column = box(page, "#map-column")
        shown = box(page, "#map img")
        assert shown["width"] >= 0.9 * (column["width"] - 40), (shown, column)
        picture = map_picture(page)
        assert picture.height >= 0.75 * picture.width, picture.size
        assert legend_text_px(page, picture) >= 11 and title_text_px(page, picture) >= 11
        assert page.locator("#map button[aria-label='Fullscreen']").count() == 0
        assert page.locator("#map [aria-label='Download'], #map a[download]").count() >= 1
        page.locator("#map").screenshot(path=str(tmp_path / "phone-map-kept.png"))
        # 5 crops in Groups: a legend that fits (one line per crop), the photo most of the picture
        switch_view(page, "Groups")
        groups = map_picture(page)
        assert photo_rows(groups).sum() >= 0.45 * groups.height, (photo_rows(groups).sum(), groups.size)
        assert legend_text_px(page, groups) >= 11
        assert len(ink_heights(groups, slice(np.flatnonzero(photo_rows(groups))[-1] + 1, None))) <= 12
        page.locator("#map").screenshot(path=str(tmp_path / "phone-map-groups.png"))
        switch_view(page, "Kept tokens")
        # item 3: a click's readout, then a message with a new image: the readout, about the image before, goes
        picture = map_picture(page)
        scale = shown_scale(page, picture)
        page.locator("#map img").tap(position={"x": 0.5 * picture.width * scale, "y": 0.3 * picture.height * scale})
        page.wait_for_function("() => /row \\d+, column \\d+/.test(document.querySelector('#patch-info').innerText)",
                               timeout=30_000)
        page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
        page.wait_for_selector("#textbox img", timeout=15_000)
        ask(page, "And this one?")
        page.wait_for_function(STATS_DONE + " && document.querySelector('#caption').innerText.includes('Image 2')",
                               timeout=90_000)
        wait_until_textbox_is_back(page)
        assert page.locator("#patch-info").inner_text().strip() == ""
        # the image picker: named, on its own row above the views (never read as a fourth view)
        picker, views = box(page, "#map-image"), box(page, "#view")
        assert "Image on the map" in page.locator("#map-image").inner_text()
        assert picker["y"] + picker["height"] <= views["y"] + 1
        assert page.evaluate(TOO_WIDE, 390) == [] and page.evaluate(CLIPPED) == []
        page.screenshot(path=str(tmp_path / "phone-two-images.png"), full_page=True)


def test_the_map_on_a_laptop(url, tmp_path):
    with page_of(url, 1500, 1000) as page:
        page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
        page.wait_for_selector("#textbox img", timeout=15_000)
        ask(page, "What animal is this?")
        page.wait_for_function(STATS_DONE, timeout=90_000)
        wait_until_textbox_is_back(page)
        picture = map_picture(page)
        assert legend_text_px(page, picture) >= 11 and title_text_px(page, picture) >= 11
        # item 7: the second turn says how many prompt tokens came from the cache
        ask(page, "What colour is it?")
        page.wait_for_function(STATS_DONE + " && /yes \\/ \\d+ of \\d+ prompt tokens from the cache/"
                               ".test(document.querySelector('#stats').innerText)", timeout=90_000)
        wait_until_textbox_is_back(page)
        # item 6: Manual: the first pick neither moves nor resizes the map (the caption sits under it)
        page.locator("#method label", has_text="Manual").click()
        page.wait_for_function("() => document.querySelector('#caption').innerText.includes('no patches picked')",
                               timeout=30_000)
        before = box(page, "#map img")
        picture = map_picture(page)
        scale = shown_scale(page, picture)
        old = page.locator("#map img").get_attribute("src")
        page.locator("#map img").click(position={"x": (before["width"] - picture.width * scale) / 2
                                                 + 0.25 * picture.width * scale,
                                                 "y": (before["height"] - picture.height * scale) / 2
                                                 + 0.4 * picture.height * scale})
        page.wait_for_function("(old) => document.querySelector('#map img').src !== old", arg=old, timeout=30_000)
        page.wait_for_function("() => document.querySelector('#caption').innerText.includes('picked by hand')",
                               timeout=30_000)
        after = box(page, "#map img")
        assert abs(after["y"] - before["y"]) <= 1 and abs(after["height"] - before["height"]) <= 1, (before, after)
        assert "picked" in page.locator("#patch-info").inner_text()
        page.screenshot(path=str(tmp_path / "laptop-manual.png"))


def test_phone_compare_and_the_first_screen_after_an_example(url, tmp_path):
    with page_of(url, 390, 844, touch=True) as page:
        page.locator("#chatbot .example").first.tap()
        page.wait_for_function(STATS_DONE, timeout=90_000)
        wait_until_textbox_is_back(page)
        page.evaluate("() => window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        # the photo and its question stay in the chat's view while the answer streams under them
        chat = box(page, "#chatbot")
        photo = page.locator("#chatbot .message.user img").first.bounding_box()
        assert photo is not None and photo["y"] >= chat["y"] - 1 and photo["y"] + photo["height"] <= chat["y"] + \
            chat["height"] + 1, (photo, chat)
        assert inside(photo, 390, 844)
        page.screenshot(path=str(tmp_path / "phone-after-example.png"))
        page.get_by_role("tab", name="Compare").tap()
        for label in ("VisionZip", "DivPrune", "VisPruner", "Random", "Full"):
            page.locator("#compare-methods label", has_text=label).tap()
        page.locator("#compare").tap()
        page.wait_for_function("() => document.querySelectorAll('#compare-maps img').length === 5", timeout=180_000)
        column = box(page, "#map-column")
        for image in page.locator("#compare-maps img").all():  # one map per row, as wide as the column
            image.scroll_into_view_if_needed()
            page.wait_for_function("(i) => i.complete && i.naturalWidth > 0", arg=image.element_handle(),
                                   timeout=15_000)
            assert image.bounding_box()["width"] >= 0.8 * (column["width"] - 40), image.bounding_box()
        overlap = page.locator("#compare-overlap table")
        assert overlap.evaluate("t => t.scrollWidth <= t.clientWidth + 1")  # every method's column in view
        assert inside(overlap.bounding_box(), 390, 10_000)
        assert page.locator("#compare-overlap th").all_inner_texts()[-1].replace("\n", "") in (
            "Random", "VisPruner", "DivPrune", "VisionZip")
        for selector in ("#compare-table", "#compare-table table", "#compare-overlap"):  # no inner scroll boxes
            assert page.locator(selector).first.evaluate("e => e.scrollHeight <= e.clientHeight + 1"), selector
        assert page.evaluate(TOO_WIDE, 390) == [] and page.evaluate(CLIPPED) == []
        page.screenshot(path=str(tmp_path / "phone-compare.png"), full_page=True)
