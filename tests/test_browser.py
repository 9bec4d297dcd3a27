"""End to end in real headless Chromium (Debian's package, never a downloaded browser): upload an
example image, ask, wait for the streamed answer and the selection map, save a screenshot."""

import contextlib
import os
import re
import shutil

import pytest

from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser test: install Debian's chromium (see .ci/run)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def url(tiny_ov, tiny_ov_large):
    import app
    # what `python app.py` shows offline: tiny-ov-large guided by tiny-ov-small for SGL
    demo = app.build_demo(tiny_ov_large, banner="**Offline demo:** tiny random-weight models; answers are random "
                          "text until real weights are available.", max_new_tokens=24, small=tiny_ov)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", **app.launch_options())
    yield local_url
    demo.close()


def map_image(page):
    """The map as the page shows it, fetched from its URL."""
    import io
    from PIL import Image
    src = page.locator("#map img").get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def click_map(page, fx: float, fy: float):
    """Click the map at a fraction (fx, fy) of its picture (the picture is fitted inside its box, centred)."""
    b = page.locator("#map img").bounding_box()
    w, h = page.locator("#map img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    scale = min(b["width"] / w, b["height"] / h, 1)
    x0, y0 = (b["width"] - w * scale) / 2, (b["height"] - h * scale) / 2
    page.locator("#map img").click(position={"x": x0 + fx * w * scale, "y": y0 + fy * h * scale})


def wait_for_new_map(page, old_src):
    page.wait_for_function("(old) => { const i = document.querySelector('#map img'); return i && i.src !== old; }",
                           arg=old_src, timeout=60_000)


def test_chat_maps_views_and_manual_picks(url, tiny_ov_large, tmp_path):
    import numpy as np
    from PIL import Image
    from pipeline import encode_image
    from tests.test_heatmap import centres
    photo = Image.open(ROOT / "assets" / "chelsea.png").convert("RGB")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})  # a laptop screen
            page.goto(url)
            page.wait_for_selector("#textbox textarea", timeout=30_000)
            page.wait_for_selector("#settings.open", timeout=10_000)  # (the settings panel opens on a wide screen)
            assert "Offline demo" in page.locator("#offline-banner").inner_text()
            assert not page.locator("#stop").is_visible()  # Stop shows only while an answer streams
            page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
            page.wait_for_selector("#textbox img", timeout=15_000)  # the upload preview
            ask(page, "What animal is this?")
            page.wait_for_selector("#map img", timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('#stats') && document.querySelector('#stats').innerText.includes('time to first token') "
                "&& /\\d+ ms/.test(document.querySelector('#stats').innerText)", timeout=60_000)
            wait_until_textbox_is_back(page)
            assert not page.locator("#stop").is_visible()
            caption = page.locator("#caption").inner_text()
            assert "54 dominant + 10 contextual" in caption and "visual tokens" in caption
            assert page.locator("#chatbot .message.bot").last.inner_text().strip()
            assert page.locator("#chatbot img").count() >= 1  # the uploaded photo in the conversation
            box = page.locator("#map img").bounding_box()
            assert box["width"] > 400 and box["height"] < 560  # one canvas, the whole image and the tiles, in view
            # the kept view shows the photo where tokens are kept, faded elsewhere (same model, same picture)
            shown = np.asarray(map_image(page), dtype=np.float32)
            comp = encode_image(tiny_ov_large, photo, "visionzip")
            original = np.asarray(photo, dtype=np.float32)
            kept = [(shown[y, x], original[oy, ox]) for i, u, x, y, ox, oy in centres(comp, photo)
                    if comp.crops[i].groups[u] == -1]
            got, want = np.array(kept).transpose(1, 0, 2)
            assert len(kept) > 30 and abs(got.mean() - want.mean()) / want.mean() < 0.05
            # each view, and a click on a patch says what it is
            for view in ("Groups (merged / pooled)", "Scores", "Kept tokens"):
                old = page.locator("#map img").get_attribute("src")
                page.locator("#view label", has_text=view).click()
                wait_for_new_map(page, old)
                if os.environ.get("ZIPCHAT_UPDATE_SCREENSHOT"):
                    name = {"Groups (merged / pooled)": "groups", "Scores": "scores", "Kept tokens": "kept"}[view]
                    page.locator("#map").screenshot(path=str(ROOT / "docs" / f"map-{name}.png"))
            click_map(page, 0.2, 0.3)
            page.wait_for_function("() => /row \\d+, column \\d+/.test(document.querySelector('#patch-info').innerText)",
                                   timeout=30_000)
            assert "score" in page.locator("#patch-info").inner_text()
            # SGL with both models on VisionZip tokens: the importance view appears
            page.locator("#method label", has_text="SGL").click()
            page.get_by_text("SGL: a small model guides the large one").click()  # (its settings: closed)
            page.locator("#sgl_zip input").check()
            page.wait_for_timeout(800)
            ask(page, "And what colour is it?")
            page.wait_for_function("() => document.querySelector('#stats').innerText.includes('SGL: answered by')",
                                   timeout=60_000)
            wait_until_textbox_is_back(page)
            assert "192 of 1836" in page.locator("#stats").inner_text()
            old = page.locator("#map img").get_attribute("src")
            page.locator("#view label", has_text="Importance (SGL)").click()
            wait_for_new_map(page, old)
            # manual: start from VisionZip's picks, add a patch by clicking, ask: exactly those tokens are sent
            page.locator("#method label", has_text="Manual").click()
            page.wait_for_selector("#picks-from-visionzip", state="visible", timeout=30_000)
            page.locator("#picks-from-visionzip").click()
            page.wait_for_function("() => /^\\d+ patches picked/.test(document.querySelector('#patch-info').innerText)",
                                   timeout=30_000)
            before = int(page.locator("#patch-info").inner_text().split()[0])
            click_map(page, 0.25, 0.6)
            page.wait_for_function("(old) => { const m = /^(\\d+) patches picked/.exec("
                                   "document.querySelector('#patch-info').innerText); return m && +m[1] !== old; }",
                                   arg=before, timeout=30_000)
            picked = int(page.locator("#patch-info").inner_text().split()[0])
            assert picked in (before - 1, before + 1)
            ask(page, "Look again?")
            page.wait_for_function("() => document.querySelector('#stats').innerText.includes('(Manual)')",
                                   timeout=60_000)
            wait_until_textbox_is_back(page)
            assert f"{picked} of 1836" in page.locator("#stats").inner_text()
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare").click()
            page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('Manual')",
                                   timeout=60_000)
            page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('first token')",
                                   timeout=60_000)
            table = page.locator("#compare-table").inner_text()
            assert "VisionZip" in table and "Full" in table
            page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)  # (docs: test_page_layout.py)
            error_then_keep_chatting(page)
        finally:
            browser.close()


def test_compare_three_methods(url, tmp_path):
    """Compare VisionZip, DivPrune and FastV on the person's photo: a column, an answer and a kept-tokens map
    for each, side by side, and the overlap of what they kept."""
    import io
    from PIL import Image
    with open_page(url, 1500, 1000) as page:
        upload_and_ask(page)
        page.wait_for_function("() => document.querySelector('#stats').innerText.includes('time to first token')",
                               timeout=60_000)
        wait_until_textbox_is_back(page)
        page.get_by_role("tab", name="Compare").click()
        for label in ("VisionZip", "DivPrune", "FastV"):
            page.locator("#compare-methods label", has_text=label).click()
        page.locator("#compare").click()
        page.wait_for_function("() => document.querySelector('#compare-overlap').innerText.includes('Jaccard')",
                               timeout=90_000)
        rows = [r.split("\t")[0] for r in page.locator("#compare-table tbody tr").all_inner_texts()]
        assert rows == ["VisionZip", "DivPrune", "FastV"], rows
        answers = page.locator("#compare-answers").inner_text()
        assert all(f"{m}:" in answers for m in ("VisionZip", "DivPrune", "FastV"))
        maps = page.locator("#compare-maps img")
        page.wait_for_function("() => document.querySelectorAll('#compare-maps img').length >= 3", timeout=30_000)
        assert maps.count() == 3
        captions = page.locator("#compare-maps").inner_text()
        assert "DivPrune: 192 of 1836" in captions and "FastV: 918 of 1836" in captions
        for i in range(3):  # each map is a real picture: the photo, faded where not kept
            picture = Image.open(io.BytesIO(page.request.get(maps.nth(i).get_attribute("src")).body()))
            assert picture.width > 100 and len(set(picture.convert("L").getdata())) > 50
        overlap = page.locator("#compare-overlap").inner_text()
        assert "VisionZip" in overlap and "DivPrune" in overlap and "FastV" in overlap
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)  # (docs: test_page_layout.py)


@contextlib.contextmanager
def open_page(url, width, height):
    """The app in a fresh headless Chromium page of this size, loaded."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#textbox textarea", timeout=30_000)
            if width >= 700:
                page.wait_for_selector("#settings.open", timeout=10_000)  # (opens on a wide screen)
            yield page
        finally:
            browser.close()


def upload_and_ask(page, question="What animal is this?"):
    page.set_input_files("#textbox input[type=file]", str(ROOT / "assets" / "chelsea.png"))
    page.wait_for_selector("#textbox img", timeout=15_000)
    ask(page, question)


def ask(page, text):
    page.locator("#textbox textarea").fill(text)
    page.locator("#textbox textarea").press("Enter")


def wait_until_textbox_is_back(page):
    page.wait_for_function("() => !document.querySelector('#textbox textarea').disabled", timeout=60_000)


def error_then_keep_chatting(page):
    """A refused question, then a request that fails inside Gradio (the browser sends a broken chat
    history): each time the message shows and the textbox comes back, and the chat goes on."""
    bots = page.locator("#chatbot .message.bot")
    ask(page, "why " * 2500)  # 10,000 characters: over the limit
    page.wait_for_function("() => [...document.querySelectorAll('#chatbot .message.bot')].pop().innerText"
                           ".includes('limit is 8,000')", timeout=60_000)
    wait_until_textbox_is_back(page)

    def corrupt(route):  # the answer request for "BREAK" carries a chat history Gradio cannot read
        body = route.request.post_data or ""
        if "BREAK" in body and '"fn_index"' in body:
            import json
            data = json.loads(body)
            data["data"][0] = "not a chat history"
            return route.continue_(post_data=json.dumps(data))
        return route.continue_()

    page.route("**/queue/join*", corrupt)
    ask(page, "BREAK")
    page.wait_for_timeout(500)
    wait_until_textbox_is_back(page)  # the answer failed in Gradio: .failure gave the textbox back
    page.unroute("**/queue/join*")
    stats = page.locator("#stats").inner_text()
    ask(page, "Still there?")
    page.wait_for_function("(old) => document.querySelector('#stats').innerText !== old", arg=stats, timeout=60_000)
    wait_until_textbox_is_back(page)
    assert bots.last.inner_text().strip() and "⚠️" not in bots.last.inner_text()


@pytest.mark.parametrize("large, small", [("tiny-next", None), ("tiny-internvl-large", "tiny-internvl-small"),
                                          ("tiny-llava", None), ("tiny-qwen-large", "tiny-qwen-small")])
def test_each_family_answers_in_the_browser(large, small, tmp_path):
    """Every family through the page: upload, ask, see its maps and stats; SGL where it has a pair."""
    import app
    from pipeline import load_vlm
    vlm, guide = load_vlm(large), (load_vlm(small) if small else None)
    demo = app.build_demo(vlm, max_new_tokens=8, small=guide)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", **app.launch_options())
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1250})
                page.goto(url)
                page.wait_for_selector("#textbox textarea", timeout=30_000)
                page.wait_for_selector("#settings.open", timeout=10_000)
                assert large in page.locator("body").inner_text()  # the model line
                upload_and_ask(page)
                page.wait_for_selector("#map img", timeout=60_000)
                page.wait_for_function("() => document.querySelector('#stats').innerText.includes('time to first token')",
                                       timeout=60_000)
                wait_until_textbox_is_back(page)
                caption = page.locator("#caption").inner_text()
                share = " (the 54+10 per 576 share)" if "qwen" in large else ""  # dynamic resolution
                assert re.search(r"\d+ dominant \+ \d+ contextual" + re.escape(share) + r".* of \d+ visual tokens", caption)
                assert page.locator("#chatbot .message.bot").last.inner_text().strip()
                if guide is not None:
                    page.locator("#method label", has_text="SGL").click()
                    page.wait_for_timeout(800)
                    ask(page, "And its colour?")
                    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('SGL: answered by')",
                                           timeout=60_000)
                page.screenshot(path=str(tmp_path / f"{large}.png"), full_page=True)
                if os.environ.get("ZIPCHAT_SCREENSHOTS"):
                    shutil.copy(tmp_path / f"{large}.png", os.environ["ZIPCHAT_SCREENSHOTS"])
            finally:
                browser.close()
    finally:
        demo.close()
