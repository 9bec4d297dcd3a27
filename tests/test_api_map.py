"""Every map endpoint docs/api.md lists works from gradio_client alone: /map_image picks any image of the
conversation (the page's own choices are filled by a follow-up the API does not run), /click_at clicks a pixel
of the map, and /click without a click says to use /click_at."""

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from tests.appclient import CAT, send  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

COFFEE = str(ROOT / "assets" / "coffee.png")


@pytest.fixture(scope="module")
def url(tiny_llava):
    demo = app.build_demo(tiny_llava, max_new_tokens=3)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def test_map_image_and_click_at_work_from_the_api(url):
    from PIL import Image
    c = Client(url, verbose=False)
    history, _, _, caption = send(c, [], "What is it?", [CAT])
    history, _, shown, caption = send(c, history, "And this one?", [COFFEE])
    assert caption.startswith("Image 2 of 2")
    shown, caption, view, info = c.predict("1", "kept", api_name="/map_image")
    assert caption.startswith("Image 1 of 2") and info == ""
    _, caption, _, info = c.predict("7", "kept", api_name="/map_image")
    assert "No image '7' in this conversation (2 images)" in caption
    width, height = Image.open(shown).size
    _, _, info = c.predict("kept", 0, width // 2, height // 2, api_name="/click_at")
    assert "row" in info and "column" in info and ("dominant" in info or "contextual token" in info)
    _, _, info = c.predict("kept", 0, api_name="/click")
    assert "/click_at" in info
    _, _, info = c.predict("kept", 0, -5, 3, api_name="/click_at")
    assert "x must be a pixel of the map" in info
