"""Event-level tests: the app launched in-process on the tiny model, driven with gradio_client."""

import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CAT = str(ROOT / "assets" / "chelsea.png")


@pytest.fixture(scope="module")
def url(tiny_llava):
    demo = app.build_demo(tiny_llava, banner="offline", max_new_tokens=6)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def resend(history):
    """The client hands back file parts as local paths; sending them again needs handle_file."""
    for message in history:
        for part in message["content"]:
            if part.get("type") == "file" and isinstance(part["file"], str):
                part["file"] = handle_file(part["file"])
    return history


def turn(client, history, text, files=()):
    history = resend(history)
    history, _, sel, score, _, caption = client.predict(
        history, {"text": text, "files": [handle_file(f) for f in files]}, "VisionZip", 54, 10, api_name="/add_message")
    history, stats, sel, score, _, caption = client.predict(resend(history), api_name="/respond")
    return history, stats, sel, caption


def texts(history):
    out = []
    for m in history:
        for part in m["content"]:
            if part.get("type") == "text":
                out.append((m["role"], part["text"]))
    return out


def test_upload_and_two_turns(url):
    c = Client(url, verbose=False)
    history, stats, sel, caption = turn(c, [], "What animal is this?", [CAT])
    assert "64 of 576 visual tokens" in caption and sel.endswith((".png", ".webp", ".jpeg", ".jpg"))
    assert texts(history)[-1][0] == "assistant" and texts(history)[-1][1]
    assert "| visual tokens to the LLM | 64 of 576 |" in stats and "| KV cache reused / size | no" in stats
    history, stats, _, _ = turn(c, history, "And its colour?")
    assert "| KV cache reused / size | yes" in stats and "re-used (compressed once)" in stats
    assert [r for r, _ in texts(history)] == ["user", "assistant", "user", "assistant"]


def test_method_switch_applies_next_turn(url):
    c = Client(url, verbose=False)
    history, stats, _, _ = turn(c, [], "What is it?", [CAT])
    sel, score, _, caption = c.predict("Full", 54, 10, api_name="/settings_method")
    assert "all 576 visual tokens" in caption and score is None
    history, stats, _, _ = turn(c, history, "Again?")
    assert "| visual tokens to the LLM | 576 of 576 |" in stats and "1 encoded" in stats
    sel, score, _, caption = c.predict("VisionZip", 108, 20, api_name="/settings_dominant")
    assert "108 dominant + 20 contextual = 128 of 576" in caption


def test_compare_with_full(url):
    c = Client(url, verbose=False)
    turn(c, [], "What is it?", [CAT])
    table, method_answer, full_answer = c.predict(api_name="/compare")
    assert "| visual tokens | 64 | 576 |" in table
    assert method_answer.startswith("**visionzip:**") and full_answer.startswith("**full:**")


def test_bad_uploads_are_messages(url, tmp_path):
    c = Client(url, verbose=False)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes((ROOT / "assets" / "chelsea.png").read_bytes()[:5000])
    fake = tmp_path / "notes.jpg"
    fake.write_text("not really a picture")
    history, stats, _, _ = turn(c, [], "What is it?", [str(corrupt), str(fake)])
    messages = [t for _, t in texts(history)]
    assert any("corrupt or truncated" in m for m in messages)
    assert any("not an image" in m for m in messages)
    history, _, _, _ = c.predict(resend(history), {"text": "", "files": []}, "VisionZip", 54, 10, api_name="/add_message")[:4]
    assert "Please type a question" in texts(history)[-1][1]
    history, stats, _, caption = turn(c, history, "Now this one?", [CAT])  # the session goes on
    assert "64 of 576" in caption and "| visual tokens to the LLM | 64 of 576 |" in stats


def test_two_sessions_stay_separate(url):
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    history_a, stats_a, _, _ = turn(a, [], "What animal?", [CAT])
    history_b, stats_b, sel_b, caption_b = turn(b, [], "Hello, no image here")
    assert "| visual tokens to the LLM | 0 of 0 |" in stats_b and sel_b is None
    assert "Upload an image" in caption_b
    history_a, stats_a, _, _ = turn(a, history_a, "And now?")
    assert "| KV cache reused / size | yes" in stats_a and "64 of 576" in stats_a
    b.predict(api_name="/clear")
    history_a, stats_a, _, _ = turn(a, history_a, "Still there?")  # clearing B leaves A alone
    assert "| KV cache reused / size | yes" in stats_a


@pytest.fixture(scope="module")
def sgl_url(tiny_ov, tiny_ov_large):
    demo = app.build_demo(tiny_ov_large, max_new_tokens=5, small=tiny_ov)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def test_sgl_turns_show_guidance(sgl_url):
    c = Client(sgl_url, verbose=False)
    args = ["SGL", 54, 10, 0.2, 0.5, False, 0.8, False]  # early exit off
    history, _, _, _, _, caption = c.predict([], {"text": "What is it?", "files": [handle_file(CAT)]}, *args,
                                             api_name="/add_message")
    history, stats, sel, score, importance, caption = c.predict(resend(history), api_name="/respond")
    assert "| SGL: answered by | tiny-ov-large (large model, pruned) |" in stats
    assert "SGL: large model keeps" in stats and "from layer 2" in stats and importance is not None
    # early exit at threshold 0: the small model answers, the large one is not run
    c.predict("SGL", 54, 10, 0.2, 0.5, True, 0.0, False, api_name="/settings_exit_on")
    history, _, _, _, _, _ = c.predict(resend(history), {"text": "And now?", "files": []}, *args[:5], True, 0.0, False,
                                       api_name="/add_message")
    history, stats, _, _, _, _ = c.predict(resend(history), api_name="/respond")
    assert "| SGL: answered by | tiny-ov-small (early exit) |" in stats and "| SGL: large model | not run |" in stats


def stream_then_stop(c, history, text):
    """Ask, let a few tokens stream, press Stop; -> the final (history, stats) of the turn."""
    import time
    history = c.predict(resend(history), {"text": text, "files": []}, "VisionZip", 54, 10,
                        api_name="/add_message")[0]
    job = c.submit(resend(history), api_name="/respond")
    deadline = time.time() + 60
    while len(job.outputs()) < 5 and time.time() < deadline:  # a few streamed updates
        time.sleep(0.05)
    c.predict(api_name="/stop")
    deadline = time.time() + 30
    while not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert job.done(), "Stop did not end the generation"
    history, stats = job.outputs()[-1][:2]
    return history, stats


def test_stop_ends_generation_and_the_session_goes_on(tiny_llava):
    # no stop token and a huge budget: only the Stop button can end these answers
    demo = app.build_demo(tiny_llava, max_new_tokens=20000, session_options={"stop_at_eos": False})
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    try:
        c = Client(url, verbose=False)
        history = c.predict([], {"text": "", "files": [handle_file(CAT)]}, "VisionZip", 54, 10,
                            api_name="/add_message")[0]
        history, stats = stream_then_stop(c, history, "Talk for a long time.")
        assert "(stopped)" in stats and texts(history)[-1][1]
        first_prompt = int(stats.split("| prompt tokens (computed this turn) | ")[1].split(" ")[0])
        new_tokens = int(stats.split("| decode | ")[1].split(" ")[0])
        assert 0 < new_tokens < 20000
        # the generating thread ended and released the session: the next question runs, on top of
        # the reused KV cache, with the stopped turn's partial answer in its context
        history, stats = stream_then_stop(c, history, "And now?")
        assert "| KV cache reused / size | yes" in stats and "(stopped)" in stats
        prompt = int(stats.split("| prompt tokens (computed this turn) | ")[1].split(" ")[0])
        assert prompt > first_prompt + new_tokens
    finally:
        demo.close()
