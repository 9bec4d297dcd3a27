"""Stop and Clear reach Compare: a long Compare ends at Stop (between methods or inside one's decode) and
frees the one-model queue for the next visitor; after Clear nothing of it appears; while it runs the
conversation counts as answering, so another visitor's upload cannot take its images."""

import time

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from tests.appclient import CAT, VISIONZIP, compare_rows, send, stat, texts  # noqa: E402

pytestmark = pytest.mark.slow
COFFEE = CAT.replace("chelsea.png", "coffee.png")
EIGHT = ["visionzip", "divprune", "vispruner", "random", "pool", "fastv", "manual", "full"]
LONG = VISIONZIP + (0, 2048)  # ... and the tile cap, max new tokens: 8 x 2,048 tokens, longer than the test


@pytest.fixture(scope="module")
def url(tiny_llava):
    demo = app.build_demo(tiny_llava, max_new_tokens=3, session_options={"stop_at_eos": False})
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def long_compare(url):
    """A conversation with one short answer, then its 2,048-token Compare of eight methods, started."""
    c = Client(url, verbose=False)
    history, _, _, _ = send(c, [], "What is it?", [CAT])
    c.predict("kept", "Manual", 54, 10, 0.35, 0.4, True, 0.8, False, 0, 3, api_name="/settings_method")
    c.predict(api_name="/picks_visionzip")  # (Manual compares the picks)
    c.predict("kept", *LONG, api_name="/settings_max_new_tokens")
    job = c.submit(EIGHT, api_name="/compare")
    deadline = time.time() + 120
    while not any("answering, 1 of 8" in str(o[0]) for o in job.outputs()) and time.time() < deadline:
        time.sleep(0.05)
    assert any("answering, 1 of 8" in str(o[0]) for o in job.outputs()), "no progress shown"
    return c, history, job


def wait(job, seconds):
    deadline = time.time() + seconds
    while not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert job.done(), "still running"
    return job.outputs()[-1]


def test_stop_ends_a_long_compare_and_the_queue_moves_on(url):
    a, _, job = long_compare(url)
    b = Client(url, verbose=False)
    waiting = b.submit([], {"text": "Me next?", "files": []}, *VISIONZIP, api_name="/add_message")
    history_b = waiting.result()[0]
    answer_b = b.submit(history_b, "kept", api_name="/respond")  # queued behind A's Compare (one model)
    time.sleep(1.0)
    assert not answer_b.done()
    pressed = time.time()
    a.predict(api_name="/stop")
    table, answers, maps, overlap, files = wait(job, 30)
    stopped_in = time.time() - pressed
    assert table.startswith("⏹ Stopped: 1 of 8 methods answered") and list(compare_rows(table)) == ["VisionZip"], table
    assert answers.startswith("**VisionZip:**") and len(maps) == 1
    history_b, stats_b = wait(answer_b, 60)[:2]
    assert texts(history_b)[-1][0] == "assistant" and stat(stats_b, "decode").startswith("3 tokens")
    assert stopped_in < 15, stopped_in
    # A goes on: its conversation is whole, and a Compare that nobody stops runs to its end
    a.predict("kept", *VISIONZIP, 0, 3, api_name="/settings_max_new_tokens")
    table, answers, maps, _, _ = a.predict(["visionzip", "full"], api_name="/compare")
    assert "Stopped" not in table and len(maps) == 2


def test_clear_during_a_compare_discards_it(url):
    a, _, job = long_compare(url)
    a.predict(api_name="/clear")
    table, answers, maps, overlap, files = wait(job, 30)
    assert (table, answers, maps or None, overlap) == ("", "", None, "")  # nothing of the cleared conversation comes back
    history, stats, _, caption = send(a, [], "A new start?", [CAT])  # the tab starts anew
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and len(texts(history)) == 2


def test_a_running_compare_keeps_its_images(tiny_llava):
    """While A compares, B's uploads push the image memory over its budget: A's images stay (it is
    answering); once it is done, they are the first to go."""
    from ui.handlers import Handlers
    h = Handlers(tiny_llava, max_new_tokens=2, image_memory=1)  # every upload is over the budget
    history, _, a, _ = h.add_message([], {"text": "What is it?", "files": [CAT]}, None, *VISIONZIP)
    *_, (history, a, *_) = h.respond(history, a, "kept")
    h.finish(a)
    h.start_compare(a)
    history_b, _, b, _ = h.add_message([], {"text": "And this?", "files": [COFFEE]}, None, *VISIONZIP)
    assert a.chat.images and not a.chat.images_dropped  # comparing counts as answering
    *_, last = h.compare_answers(a, ["visionzip"])
    h.finish_compare(a)
    assert list(compare_rows(last[0])) == ["VisionZip"]
    *_, (history_b, b, *_) = h.respond(history_b, b, "kept")
    h.finish(b)
    h.add_message(history_b, {"text": "Again?", "files": [CAT]}, b, *VISIONZIP)
    assert a.chat.images_dropped  # idle now: dropped first, and told so at its next message
