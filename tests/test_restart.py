"""A server restart between two turns: the page still shows the conversation (its messages come with every
event), the server has none. It is rebuilt from those messages (the next answer is the one the
uninterrupted conversation gives), or, when the images are gone too, the person is told to send them
again and the question is not answered as if the picture were not there."""

import json

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from tests.appclient import CAT, AppProcess, post, send, stat, texts  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def temp_dir(tmp_path):
    return {"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}  # the upload folder both servers use


def test_a_restart_between_two_turns_rebuilds_the_conversation(temp_dir):
    server = AppProcess("--model", "tiny-llava", "--max-new-tokens", "8", env=temp_dir)
    try:
        c = Client(server.url, verbose=False)
        history, _, _, _ = send(c, [], "What animal is this?", [CAT])
        history, _, _, _ = send(c, history, "Where is it sitting?")
        uninterrupted, stats, _, _ = send(c, history, "And its colour?")
    finally:
        server.close()
    server = AppProcess("--model", "tiny-llava", "--max-new-tokens", "8", env=temp_dir)  # a new process
    try:
        c = Client(server.url, verbose=False)
        rebuilt, rebuilt_stats, shown, caption = send(c, history, "And its colour?")
    finally:
        server.close()
    assert stat(rebuilt_stats, "visual tokens to the LLM") == "64 of 576" and "64 of 576" in caption and shown
    assert stat(rebuilt_stats, "prompt tokens (computed this turn)").split()[0] == \
        stat(stats, "prompt tokens (computed this turn)").split()[0]  # the whole conversation, not 18 tokens
    assert texts(rebuilt)[-1] == texts(uninterrupted)[-1]  # the answer of the conversation that never stopped
    assert stat(rebuilt_stats, "image") == "1 encoded"  # encoded again, once


def test_a_restart_that_lost_the_images_says_so(temp_dir, tmp_path):
    server = AppProcess("--model", "tiny-llava", "--max-new-tokens", "4", env=temp_dir)
    try:
        history, _, _, _ = send(Client(server.url, verbose=False), [], "What animal is this?", [CAT])
    finally:
        server.close()
    # what a page holds after a restart that emptied the upload folder: the server's old path, now gone
    gone = str(tmp_path / "gradio" / "0123abcd" / "chelsea.png")
    for message in history:
        for part in message["content"]:
            if part.get("type") == "file":
                part["file"] = {"path": gone, "meta": {"_type": "gradio.FileData"}}
    server = AppProcess("--model", "tiny-llava", "--max-new-tokens", "4", env=temp_dir)
    try:
        from tests.appclient import knob_defaults
        settings = ["VisionZip", 54, 10, 0.35, 0.4, True, 0.8, False, 0, 4, 0.0, 0.9, 2, 0.5, *knob_defaults()]
        message = {"text": "And its colour?", "files": []}  # (raw HTTP: the client would try to upload the path)
        after = post(server.url, "add_message", json.dumps({"data": [history, message, *settings]}))[0]
        notice = texts(after)[-1]
        assert notice[0] == "assistant" and notice[1].startswith("🔄") and "Attach the image again" in notice[1]
        after, stats = post(server.url, "respond", json.dumps({"data": [after, "kept"]}))[:2]
        assert texts(after)[-1] == notice and stats is None  # not answered: the stats are not even touched
        # the person attaches the photo again: the conversation starts anew from the notice, with the image
        for message in after:  # (the page's part for the lost file, which the client cannot send)
            message["content"] = [p for p in message["content"] if p.get("type") != "file"]
        again, stats, shown, caption = send(Client(server.url, verbose=False), after, "And its colour?", [CAT])
        assert stat(stats, "visual tokens to the LLM") == "64 of 576" and shown and "64 of 576" in caption
        assert stat(stats, "prompt tokens (computed this turn)").split()[0] == \
            stat(send(Client(server.url, verbose=False), [], "And its colour?", [CAT])[1],
                 "prompt tokens (computed this turn)").split()[0]  # nothing from before the notice
    finally:
        server.close()
