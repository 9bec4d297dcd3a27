"""Everyday use never breaks or misleads a session: big photos are kept only as large as the model
uses and all sessions' images stay under a byte budget; Stop while a question waits in the queue,
Clear while an answer streams, and a message sent while the same session answers all do what the
person means; and the small cases (a budget of a whole crop, SGL at keep ratio 0.01, the early-exit
decode rate, a click without event data)."""

import pickle
import time

import numpy as np
import pytest
from PIL import Image

from pipeline import ChatSession, InputError
from pipeline.families.base import same_layout
from pipeline.images import load_image
from pipeline.memory import MemoryBudget, state_nbytes
from tests.conftest import FAMILY_FIXTURES

gradio = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from tests.appclient import CAT, VISIONZIP, resend, send, stat, texts  # noqa: E402

LARGE = {"tiny-llava": "tiny_llava", "tiny-next": "tiny_next", "tiny-ov-large": "tiny_ov_large",
         "tiny-internvl-large": "tiny_internvl_large", "tiny-qwen-large": "tiny_qwen_large"}


def photo_of(w, h, seed=0):
    """A smooth photo-like picture (gradients and a few shapes) of any size, cheap to make."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


# ---- big photos -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LARGE)
def test_a_kept_photo_has_the_tiles_and_crops_of_the_original(name, request):
    """What a conversation keeps of a big photo is smaller, and the processor picks the same tile grid
    and crops (in proportion) for it as for the original, with the tile cap off and on."""
    vlm = request.getfixturevalue(LARGE[name])
    family = vlm.family
    for w, h in [(6000, 6000), (7300, 5000), (4000, 3000), (2400, 7200), (1152, 768)]:
        original = photo_of(w, h)
        kept = load_image(original, fit=family.compact_size)  # what ChatSession.add_image keeps
        assert kept.width <= w and kept.height <= h and abs(kept.width / kept.height - w / h) < 0.02
        for cap in (None, 4):
            assert same_layout(family.layout(original, cap), family.prepare(kept, cap)), (name, w, h, cap)
    if name == "tiny-ov-large":  # 36 MP: at most the 2304 x 2304 px OneVision tiles read (5.3 MP)
        assert np.prod(family.compact_size((6000, 6000))) <= 2304 * 2304


def test_three_36_mp_photos_pickle_small(tiny_ov_large):
    """The state crosses ZeroGPU's process boundary by pickle: three 36 MP photos with VisionZip
    features stay within 64 MiB."""
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=2)
    for seed in range(3):
        s.add_image(photo_of(6000, 6000, seed))
    s.ask("What are these?")
    size = len(pickle.dumps(s.state))
    assert size <= 64 << 20, f"{size / 2**20:.1f} MiB"
    assert s.last_turn.visual_tokens == 3 * 37 * 64  # every tile of all three was encoded (base + 6x6 each)


def test_memory_budget_drops_the_least_recently_used_idle_images(tiny_llava, photo):
    sessions = [ChatSession(tiny_llava, method="visionzip", max_new_tokens=2) for _ in range(3)]
    for s in sessions:
        s.add_image(photo)
    each = state_nbytes(sessions[0].state)
    assert each >= photo.width * photo.height * 3
    budget = MemoryBudget(max_bytes=int(2.5 * each))
    budget.touch(sessions[0].state)
    budget.touch(sessions[1].state)
    sessions[0].accept()  # answering: never dropped
    try:
        total = budget.touch(sessions[2].state)
    finally:
        sessions[0].answering.clear()
    assert sessions[1].state.images_dropped and not sessions[1].state.images
    assert not sessions[0].state.images_dropped and not sessions[2].state.images_dropped
    assert total == 2 * each
    with pytest.raises(InputError, match="upload the image again"):
        sessions[1].ask("And now?")
    sessions[1].add_image(photo)  # it starts over and goes on
    assert sessions[1].ask("What is it?") and not sessions[1].state.images_dropped


@pytest.fixture(scope="module")
def small_budget_url(tiny_llava):
    demo = app.build_demo(tiny_llava, max_new_tokens=4, image_memory=600_000)  # about one photo
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield url
    demo.close()


def test_a_dropped_session_is_told_and_goes_on(small_budget_url, tmp_path):
    a, b = Client(small_budget_url, verbose=False), Client(small_budget_url, verbose=False)
    history_a, stats, _, _ = send(a, [], "What is it?", [CAT])
    assert stat(stats, "visual tokens to the LLM") == "64 of 576"
    other = tmp_path / "other.png"
    photo_of(500, 400, 7).save(other)
    send(b, [], "And this?", [str(other)])  # B needs the memory: A is idle, its images go
    message = a.predict(resend(history_a), {"text": "Still there?", "files": []}, *VISIONZIP, api_name="/add_message")
    assert "images were dropped" in texts(message[0])[-1][1]
    assert "value" not in message[1]  # the textbox is not emptied: the message stays, to send again
    history_a, stats, _, caption = send(a, message[0], "What is it?", [CAT])  # uploaded again: it goes on
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and "64 of 576" in caption


# ---- Stop, Clear and messages while answering --------------------------------------------------------
@pytest.fixture(scope="module")
def long_url(tiny_llava):
    """Answers of 600 tokens (no stop token; several seconds streamed): long enough to press buttons while they stream."""
    demo = app.build_demo(tiny_llava, max_new_tokens=600, session_options={"stop_at_eos": False})
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield url
    demo.close()


def ask_async(c, history, text, files=(), settings=VISIONZIP):
    history = c.predict(resend(history), {"text": text, "files": [handle_file(f) for f in files]}, *settings,
                        api_name="/add_message")[0]
    return c.submit(resend(history), api_name="/respond")


def wait(job, outputs=0, timeout=120):
    deadline = time.time() + timeout
    while (len(job.outputs()) < outputs if outputs else not job.done()) and time.time() < deadline:
        time.sleep(0.02)
    assert time.time() < deadline
    return job.outputs()[-1] if outputs else job.result()


def test_stop_while_queued_cancels_that_answer_only(long_url):
    a, b = Client(long_url, verbose=False), Client(long_url, verbose=False)
    job_a = ask_async(a, [], "Talk for a long time.", [CAT])
    wait(job_a, outputs=3)  # A is answering: B's question waits in the queue
    job_b = ask_async(b, [], "What is it?", [CAT])
    b.predict(api_name="/stop")
    history_b, stats_b = wait(job_b)[:2]
    assert texts(history_b)[-1][1] == "⏹ Stopped before the answer started."
    assert "Ask a question to see timings" in stats_b  # no turn recorded
    history_a, stats_a = wait(job_a)[:2]
    assert stat(stats_a, "decode").startswith("600 tokens")  # A was not touched
    # B's next question is answered in full: the old Stop does not reach it; the image is still there
    history_b, stats_b = wait(ask_async(b, history_b, "What is it, then?"))[:2]
    assert stat(stats_b, "decode").startswith("600 tokens") and "(stopped)" not in stats_b
    assert stat(stats_b, "visual tokens to the LLM") == "64 of 576"


@pytest.mark.parametrize("after_outputs", [2, 40])
def test_clear_while_streaming_wins(long_url, after_outputs):
    c, other = Client(long_url, verbose=False), Client(long_url, verbose=False)
    # 2,048 tokens (the most the slider allows): Clear comes while it streams, however fast this machine decodes
    job = ask_async(c, [], "Talk for a long time.", [CAT], settings=VISIONZIP + (0, 2048))
    wait(job, outputs=after_outputs)
    job_other = ask_async(other, [], "What is it?", [CAT])  # another visitor waits in the queue meanwhile
    c.predict(api_name="/clear")
    final = wait(job)
    assert final[0] == [] and "Ask a question to see timings" in final[1]
    history_other, stats_other = wait(job_other)[:2]  # the other visitor's answer is whole
    assert stat(stats_other, "decode").startswith("600 tokens") and len(texts(history_other)) == 2
    started = time.time()
    history, stats = wait(ask_async(c, [], "Hello?"))[:2]
    assert stat(stats, "visual tokens to the LLM") == "0 of 0"  # neither the old image nor its turns
    assert [r for r, _ in texts(history)][:2] == ["user", "assistant"] and len(texts(history)) == 3
    assert time.time() - started < 60


def test_a_message_while_the_same_session_answers_is_refused(long_url, tmp_path):
    c = Client(long_url, verbose=False)
    job = ask_async(c, [], "Talk for a long time.", [CAT])
    history = wait(job, outputs=3)[0]
    other = tmp_path / "other.png"
    photo_of(300, 200, 3).save(other)
    refused = c.predict(resend(history), {"text": "And this one?", "files": [handle_file(other)]}, *VISIONZIP,
                        api_name="/add_message")
    assert "still being generated" in texts(refused[0])[-1][1]
    assert "value" not in refused[1]  # the textbox is not emptied: text and image stay, to send again
    history, stats = wait(job)[:2]
    assert stat(stats, "decode").startswith("600 tokens")
    history, stats = wait(ask_async(c, history, "And this one?", [str(other)]))[:2]
    assert stat(stats, "visual tokens to the LLM") == "128 of 1152"  # both images in the context
    assert stat(stats, "image") == "1 encoded"


# ---- the small cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", FAMILY_FIXTURES.values())
def test_a_budget_of_a_whole_crop_is_refused(fixture, request):
    vlm = request.getfixturevalue(fixture)
    units = vlm.family.units_per_crop
    s = ChatSession(vlm, method="visionzip")
    with pytest.raises(InputError, match="as many visual tokens as the Full method"):
        s.set_method("visionzip", units, 0)
    with pytest.raises(InputError, match="as many visual tokens as the Full method"):
        s.set_method("visionzip", units - 5, 5)
    s.set_method("visionzip", units - 1, 0)  # one below a whole crop is a budget
    assert s.settings.dominant == units - 1


def test_sgl_keeps_at_least_one_token_and_reports_the_small_models_rate(tiny_ov, tiny_ov_large, photo):
    s = ChatSession(tiny_ov_large, method="sgl", small=tiny_ov, keep_ratio=0.0005, early_exit=None, max_new_tokens=4)
    s.add_image(photo)
    s.ask("What is it?")
    visual = s.last_turn.visual_tokens
    assert visual * 0.0005 < 1 and len(s.last_turn.guidance.kept) == 1  # floor(keep_ratio x visual) would keep none
    s.set_method("sgl", early_exit=0.0, max_new_tokens=12)  # the small model always answers
    s.ask("And now?")
    assert s.last_turn.early_exit and s.last_turn.new_tokens > 1 and s.last_turn.decode_tok_per_s > 0


def test_click_without_event_data_is_a_message(long_url):
    c = Client(long_url, verbose=False)
    send(c, [], "", [CAT])  # an image, no question: the map is drawn
    out = c.predict("kept", 0, api_name="/click")
    assert "click" in out[-1].lower()
