"""A clip in the app (issue 36): sent through "Use via API" and in headless Chromium on a laptop (1500x1000) and a
phone (390x844, touch), tiny LLaVA-OneVision: two turns on the clip (the second reuses its tokens and the KV
cache), the map a sheet of the sampled frames with their kept patches, a click naming the frame and its time;
a model without video says so and the chat goes on. Qwen2.5-VL (a crop a pair of frames) and InternVL3 too. Screenshots go to the test's tmp_path (looked at when this
was written)."""

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.appclient import CAT, VISIONZIP, compare_rows, send, served_app, stat, texts, tiny_llava_app
from tests.test_video import write_clip

pytest.importorskip("av")
STATS_DONE = "() => document.querySelector('#stats').innerText.includes('first token')"


def app_on(model_fixture: str):
    """A module-wide fixture: the app served on that tiny model -> its local URL."""
    @pytest.fixture(scope="module")
    def fixture(request):
        with served_app(request.getfixturevalue(model_fixture), "**Tiny model**", max_new_tokens=6) as local_url:
            yield local_url
    return fixture


url, qwen_url, internvl_url = app_on("tiny_ov_large"), app_on("tiny_qwen_large"), app_on("tiny_internvl_large")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_clip(tmp_path_factory.mktemp("clip") / "squares.mp4", frames=45))


def test_two_turns_on_a_clip_through_the_api(url, clip):
    c = Client(url, verbose=False)
    history, stats, shown, caption = send(c, [], "What moves?", [clip])
    assert stat(stats, "visual tokens to the LLM") == "512 of 1569 (a clip of 8 frames: 64 of 196 a frame)"
    assert "8 frames" in caption
    sheet = np.asarray(Image.open(shown).convert("RGB"))
    assert sheet.shape[1] > sheet.shape[0]  # 8 frames, 4 a row: wider than tall
    assert [p["file"].rsplit("/", 1)[-1] for m in history for p in m["content"] if p.get("type") == "file"] \
        == ["squares.mp4"]  # the chat shows the clip itself
    history, stats, _, _ = send(c, history, "And its colour?")
    assert stat(stats, "KV cache reused / size").startswith("yes") and stat(stats, "image").startswith("re-used")
    readout = c.predict("kept", 0, 400, 150, api_name="/click_at")[-1]
    assert "frame" in readout and " s, row " in readout, readout
    state_map, caption, _, _ = c.predict(3, "kept", api_name="/map_frame")  # frame 3 alone, larger
    assert "the map shows frame 3 of 8 (" in caption
    alone = np.asarray(Image.open(state_map).convert("RGB"))
    assert alone.shape[0] > sheet.shape[0]  # one frame as wide as the sheet of eight: taller
    readout = c.predict("kept", 0, 400, 300, api_name="/click_at")[-1]
    assert readout.startswith("**frame 3 at"), readout
    for bad in (9, 2.5):  # within the slider's range, not this clip's frames: the handler says so
        assert c.predict(bad, "kept", api_name="/map_frame")[1].startswith("⚠️"), bad
    with pytest.raises(Exception, match="less than minimum"):  # Gradio's own check of the slider's range
        c.predict(-1, "kept", api_name="/map_frame")
    c.predict(0, "kept", api_name="/map_frame")  # back to all frames
    table, answers, maps, _, files = c.predict(["visionzip", "fastv", "full"], api_name="/compare")  # on the clip
    rows = compare_rows(table)
    assert list(rows) == ["VisionZip", "FastV", "Full"] and rows["Full"][0] == "1569" and rows["Full"][6] == "1.00"
    assert len(maps) == 3 and sum(f.endswith(".png") for f in files) == 3


def test_two_turns_on_a_clip_on_qwen(qwen_url, clip):
    """Qwen2.5-VL: 8 frames in 4 temporal pairs, each pair a crop (its 2x3 units, VisionZip's share of them); the
    frame picker counts pairs and shows the first frame of one."""
    c = Client(qwen_url, verbose=False)
    history, stats, shown, caption = send(c, [], "What moves?", [clip])
    assert stat(stats, "visual tokens to the LLM") == "4 of 24 (a clip of 4 frame pairs: 1 of 6 a pair)"
    assert "in 4 frame pairs" in caption
    history, stats, _, _ = send(c, history, "And its colour?")
    assert stat(stats, "KV cache reused / size").startswith("yes") and stat(stats, "image").startswith("re-used")
    sheet = np.asarray(Image.open(shown).convert("RGB"))
    state_map, caption, _, _ = c.predict(4, "kept", api_name="/map_frame")
    assert "the map shows frames 7-8 of 8 (" in caption
    assert np.asarray(Image.open(state_map).convert("RGB")).shape[0] > sheet.shape[0]
    assert c.predict(5, "kept", api_name="/map_frame")[1].startswith("⚠️")
    table = c.predict(["visionzip", "full"], api_name="/compare")[0]
    assert compare_rows(table)["Full"][0] == "24"


def test_a_model_without_video_says_so(tiny_llava, clip):
    with tiny_llava_app(max_new_tokens=4) as local_url:
        c = Client(local_url, verbose=False)
        history = c.predict([], {"text": "What moves?", "files": [handle_file(clip)]},
                            *VISIONZIP, api_name="/add_message")[0]
        assert "not video" in texts(history)[-1][1]
        history, stats, _, _ = send(c, [], "What is it?", [CAT])
        assert stat(stats, "visual tokens to the LLM") == "64 of 576"  # the chat goes on


@pytest.mark.browser
@pytest.mark.parametrize("width,height,touch", [(1500, 1000, False), (390, 844, True)])
@pytest.mark.parametrize("served,crops,picked", [("url", "8 frames", "shows frame 2 of 8"),
                                                 ("qwen_url", "4 frame pairs", "shows frames 3-4 of 8"),
                                                 ("internvl_url", "8 frames", "shows frame 2 of 8")])
def test_a_clip_in_chromium(served, crops, picked, clip, tmp_path, width, height, touch, request):
    """LLaVA-OneVision and InternVL3 (a frame a crop) and Qwen2.5-VL (a pair of frames a crop)."""
    pytest.importorskip("playwright.sync_api")
    url = request.getfixturevalue(served)
    from tests.test_browser import ask, wait_until_textbox_is_back
    from tests.test_page_layout import CLIPPED, TOO_WIDE, page_of
    with page_of(url, width, height, touch=touch) as page:
        page.set_input_files("#textbox input[type=file]", clip)
        page.wait_for_timeout(1500)
        ask(page, "What moves in this clip?")
        page.wait_for_function(STATS_DONE, timeout=120_000)
        wait_until_textbox_is_back(page)
        assert crops in page.locator("#caption").inner_text()
        assert page.locator("#chatbot video").count() == 1  # the clip plays in the chat
        ask(page, "And then?")
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message.bot').length >= 2", timeout=60_000)
        wait_until_textbox_is_back(page)
        page.wait_for_function("() => document.querySelector('#stats').innerText.includes('yes')", timeout=60_000)
        assert page.evaluate(TOO_WIDE, width) == [] and page.evaluate(CLIPPED) == []
        page.screenshot(path=str(tmp_path / f"clip-{served}-{width}.png"), full_page=True)
        frame = page.locator("#map-frame input[type=number]")  # the frame picker: frame 2 alone
        frame.fill("2")
        frame.press("Tab")  # (the slider's number box says "release" as it loses the focus)
        page.wait_for_function(f"() => document.querySelector('#caption').innerText.includes('{picked}')",
                               timeout=30_000)
        assert page.evaluate(TOO_WIDE, width) == [] and page.evaluate(CLIPPED) == []
        page.screenshot(path=str(tmp_path / f"frame-{served}-{width}.png"), full_page=True)
