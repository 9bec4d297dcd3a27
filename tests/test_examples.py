"""The example gallery is compressed ahead, at low priority: an example then answers without encoding,
with the answer it would have had; a person's answer comes first; the app does it right after launch."""

import threading
import time

import pytest

import app
from pipeline import ChatSession
from pipeline.examples import ExampleCache
from pipeline.stopflag import AnsweringFlag
from tests.appclient import CAT, AppProcess, send, stat

gradio = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402


def test_an_example_answers_without_encoding_and_the_same(tiny_ov_large):
    examples = ExampleCache()
    examples.warm(tiny_ov_large, app.example_paths(), "visionzip", max_tiles=4, polite=False)
    assert len(examples) == 4 and examples.nbytes > 0
    answers = []
    for cache in (examples, None):
        s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=6, max_tiles=4, examples=cache)
        s.add_image(CAT)
        answers.append(s.ask("What animal is this?"))
        assert s.last_turn.images_encoded == (0 if cache else 1)
    assert answers[0] == answers[1]
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=2, max_tiles=0, examples=examples)
    s.add_image(CAT)  # other settings: not in the cache, encoded as usual
    s.ask("And now?")
    assert s.last_turn.images_encoded == 1


def test_the_warm_up_waits_while_a_person_is_answered(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPCHAT_STOP_DIR", str(tmp_path))  # only this test's flag: none another test left
    examples = ExampleCache()
    busy = AnsweringFlag("warmuptest0")
    busy.set()
    try:
        worker = threading.Thread(target=examples.warm, args=(tiny_llava, app.example_paths()), daemon=True)
        worker.start()
        time.sleep(1.0)
        assert len(examples) == 0  # nothing encoded while someone's answer runs
    finally:
        busy.clear()
    worker.join(timeout=60)
    assert len(examples) == 4
    busy.set()  # inside a GPU call (ZeroGPU) queued questions count as answering: it must not wait for them
    try:
        impolite = ExampleCache()
        impolite.warm(tiny_llava, app.example_paths()[:1], polite=False)
        assert len(impolite) == 1
    finally:
        busy.clear()


@pytest.mark.slow
def test_the_app_compresses_the_examples_after_launch(tmp_path):
    proc = AppProcess("--model", "tiny-llava", env={"ZIPCHAT_WARM_EXAMPLES": "1", "ZIPCHAT_STOP_DIR": str(tmp_path)})
    try:
        deadline = time.time() + 90
        while True:  # the warm-up runs in the background: an example soon needs no encode
            _, stats, _, caption = send(Client(proc.url, verbose=False), [], "What animal is this?", [CAT])
            if stat(stats, "image") == "compressed at launch (an example)" or time.time() > deadline:
                break
            time.sleep(1)
        assert stat(stats, "image") == "compressed at launch (an example)" and "64 of 576" in caption
    finally:
        proc.close()
