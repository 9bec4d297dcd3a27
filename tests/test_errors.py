"""Every bad input gets a clear InputError, and the next good request succeeds."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import ChatSession, InputError, ModelUnavailable, encode_image, load_vlm
from tests.conftest import ROOT


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "not an image": (lambda photo: b"hello, this is a text file", "not an image"),
    "corrupt": (lambda photo: png_bytes(photo)[: len(png_bytes(photo)) // 2], "corrupt or truncated"),
    "zero size": (lambda photo: np.zeros((0, 10, 3), np.uint8), "not an image|empty"),
    "enormous": (lambda photo: Image.new("L", (8000, 6000)), "too large"),
    "missing file": (lambda photo: "/nonexistent/cat.png", "No such image"),
    "wrong type": (lambda photo: 12345, "Expected an image"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_then_good_request(tiny_llava, photo, case):
    make, message = BAD_IMAGES[case]
    s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=4)
    s.add_image(photo)
    s.ask("first question")
    before = list(s.state.turns)
    with pytest.raises(InputError, match=message):
        s.add_image(make(photo))
    assert s.state.turns == before and s.state.pending == []  # nothing was lost or half-added
    assert s.ask("still there?")
    assert s.last_turn.cache_reused


def test_empty_question(tiny_llava, photo):
    s = ChatSession(tiny_llava, max_new_tokens=4)
    s.add_image(photo)
    for q in ["", "   \n", None]:
        with pytest.raises(InputError, match="type a question"):
            s.ask(q)
    assert s.ask("now a real one") and s.last_turn.visual_tokens == 576


def test_budget_and_method_errors(tiny_llava, tiny_ov, photo):
    with pytest.raises(InputError, match="larger than the 577"):
        ChatSession(tiny_llava, method="visionzip", dominant=570, contextual=10)
    with pytest.raises(InputError, match="larger than the 729"):
        ChatSession(tiny_ov, method="visionzip", dominant=700, contextual=30)
    s = ChatSession(tiny_llava, method="visionzip")
    with pytest.raises(InputError, match="Unknown method"):
        s.set_method("zip")
    with pytest.raises(InputError):
        s.set_method("visionzip", 600, 0)
    assert s.settings.method == "visionzip" and s.settings.dominant == 54  # unchanged after a refused change
    s.set_method("visionzip", max_new_tokens=3)
    s.add_image(photo)
    assert s.ask("ok?")


def test_unknown_model_name():
    with pytest.raises(ModelUnavailable, match="Unknown model 'llava-9000'") as refused:
        load_vlm("llava-9000")
    assert isinstance(refused.value, ValueError)  # callers catching ValueError see it too
    assert all(preset in str(refused.value) for preset in ("llava-ov-0.5b", "llava-1.5-7b", "tiny-llava"))


def test_hub_model_without_network_says_how_to_get_it():
    with pytest.raises(ModelUnavailable, match="llava-ov-0.5b.*(cannot be reached|Could not load)"):
        load_vlm("llava-ov-0.5b")  # HF_HUB_OFFLINE=1 in tests: fails fast, no network


def test_cli_ask_prints_answer_and_stats():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "ask", "--model", "tiny-ov-small", "--image", "assets/chelsea.png",
         "--method", "visionzip", "--max-new-tokens", "5", "What is this?", "And now?"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = encode_image(load_vlm("tiny-ov-small"), Image.open(ROOT / "assets" / "chelsea.png").convert("RGB"))
    assert f"image: {expected.caption()}" in out.stdout  # "64 x 3 crops = 192 of 1728 visual tokens"
    assert out.stdout.count("\nA: ") == 2 and "cache reused: True" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "ask", "--image", "README.md", "What?"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not an image" in bad.stderr and "Traceback" not in bad.stderr
