"""The app as a Hugging Face Space runs it: `python app.py` with the Space's environment, and on
ZeroGPU, where every GPU call runs in a worker process (tests/zerogpu/spaces: a stand-in, strict with a
fresh fork per call and everything copied, or as the real package with one reused worker and shared CPU
tensors), and with the real `spaces` package off ZeroGPU."""

import importlib.util
import json
import os
import pickle

import pytest
import torch

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from tests.appclient import CAT, VISIONZIP, AppProcess, send, stat, texts  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.test_app import stream_then_stop  # noqa: E402

pytestmark = pytest.mark.slow


def listening_address(port: int) -> str:
    """The local address a socket listens on for `port`, read from /proc/net/tcp."""
    for line in (open("/proc/net/tcp").read().splitlines()[1:]):
        local, state = line.split()[1], line.split()[3]
        host, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.parametrize("server_name, expected", [("0.0.0.0", "0.0.0.0"), (None, "127.0.0.1")])
def test_listens_where_the_space_says(server_name, expected):
    env = {"GRADIO_SERVER_NAME": server_name} if server_name else {}
    proc = AppProcess("--model", "tiny-llava", env=env, unset=() if server_name else ("GRADIO_SERVER_NAME",))
    try:
        assert listening_address(proc.port) == expected  # the port itself came from GRADIO_SERVER_PORT
        history, _, _, _ = send(Client(proc.url, verbose=False), [], "Hello?")  # and it answers (over loopback)
        assert texts(history)[-1][1]
    finally:
        proc.close()


def load_stub(mode: str, monkeypatch):
    monkeypatch.setenv("ZEROGPU_STUB_MODE", mode)
    spec = importlib.util.spec_from_file_location("zerogpu_stub", ROOT / "tests" / "zerogpu" / "spaces" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["strict", "reuse"])
def test_stub_crosses_processes_as_its_mode_says(mode, monkeypatch):
    """strict: a fresh process per call, everything copied; reuse (the real package's behaviour): one
    worker kept between calls, CPU tensors shared (an in-place change is seen), other objects copied.
    Both: only a gr.Error crosses as itself; other exceptions arrive as their class name; models refused."""
    import gradio as gr
    spaces = load_stub(mode, monkeypatch)

    @spaces.GPU(duration=5)
    def change(items, tensor):
        items.append(1)  # a list is copied: lost in both modes
        tensor += 1  # a CPU tensor: shared by the real package's queue
        return len(items), os.getpid()

    seen, tensor = [], torch.zeros(3)
    n, first = change(seen, tensor)
    assert n == 1 and seen == [] and first != os.getpid()
    assert tensor.tolist() == ([1.0] * 3 if mode == "reuse" else [0.0] * 3)
    second = change(seen, tensor)[1]
    assert (second == first) == (mode == "reuse")

    @spaces.GPU(duration=5)
    def fail(told):
        if told:
            raise gr.Error("Please upload an image.")
        raise KeyError("a detail the visitor never sees")

    with pytest.raises(gr.Error, match="Please upload an image."):
        fail(True)
    with pytest.raises(gr.Error) as e:
        fail(False)
    assert "KeyError" in str(e.value) and "detail" not in str(e.value)
    with pytest.raises(pickle.PicklingError, match="Linear"):
        spaces.GPU(duration=5)(lambda m: 0)(torch.nn.Linear(2, 2))
    with pytest.raises(gr.Error, match="PicklingError"):  # and nothing comes back holding one either
        spaces.GPU(duration=5)(lambda: torch.nn.Linear(2, 2))()

    @spaces.GPU(duration=lambda n: n)
    def count(n):
        for i in range(n):
            yield i

    assert list(count(3)) == [0, 1, 2]
    stream = count(100)
    assert next(stream) == 0
    stream.close()  # the caller stops reading: the worker closes the generator (and, reused, serves again)
    assert list(count(2)) == [0, 1]
    with pytest.raises(TypeError, match="duration"):
        list(count(0))  # a zero-second slot is refused as the real package would


def scenario(url: str, sgl: bool = False) -> dict:
    """A conversation through the public events: three turns about an image with a method switch
    (or two SGL turns, the second an early exit), then Compare. -> answers and stats."""
    c = Client(url, verbose=False)
    if sgl:
        settings = [("SGL", 54, 10, 0.2, 0.5, False, 0.8, False), ("SGL", 54, 10, 0.2, 0.5, True, 0.0, False)]
        questions = ["What is it?", "And now?"]
    else:
        settings = [VISIONZIP, VISIONZIP, ("Full",) + VISIONZIP[1:]]
        questions = ["What is it?", "What colour is it?", "Describe it."]
    history, stats = [], []
    for i, (q, s) in enumerate(zip(questions, settings)):
        history, st, _, caption = send(c, history, q, [CAT] if i == 0 else [], settings=s)
        stats.append(st)
    compared = c.predict(api_name="/compare")
    return {"answers": [t for r, t in texts(history) if r == "assistant"], "stats": stats,
            "compare": compared[1], "caption": caption}


@pytest.fixture(scope="module")
def zerogpu_log(tmp_path_factory):
    return tmp_path_factory.mktemp("zerogpu") / "calls.jsonl"


@pytest.mark.parametrize("mode", ["strict", "reuse"])
@pytest.mark.parametrize("pair", [False, True], ids=["llava", "sgl-ov-pair"])
def test_zerogpu_answers_equal_in_process(pair, mode, tiny_llava, tiny_ov, tiny_ov_large, tmp_path):
    model, small, tokens = (tiny_ov_large, tiny_ov, 6) if pair else (tiny_llava, None, 8)
    demo = app.build_demo(model, max_new_tokens=tokens, small=small)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    try:
        local = scenario(url, sgl=pair)
    finally:
        demo.close()
    calls_log = tmp_path / "calls.jsonl"
    proc = AppProcess("--model", model.name, "--max-new-tokens", str(tokens), zerogpu=mode,
                      env={"ZEROGPU_STUB_LOG": str(calls_log)})
    try:
        remote = scenario(proc.url, sgl=pair)
    finally:
        proc.close()
    assert remote["answers"] == local["answers"] and len(local["answers"]) == (2 if pair else 3)
    assert remote["compare"] == local["compare"] and remote["caption"] == local["caption"]
    for a, b in zip(local["stats"], remote["stats"]):
        assert stat(a, "visual tokens to the LLM") == stat(b, "visual tokens to the LLM")
    # in-process and in a reused worker the KV cache is reused; a fresh worker (strict) prefills the
    # conversation again (images stay compressed: encoded once, in the first turn, and carried in the state)
    assert stat(local["stats"][1], "KV cache reused / size").startswith("yes")
    assert stat(remote["stats"][1], "KV cache reused / size").startswith("yes" if mode == "reuse" else "no")
    assert stat(remote["stats"][1], "image") == "re-used (compressed once)"
    if pair:
        assert stat(remote["stats"][0], "SGL: answered by") == "tiny-ov-large (large model, pruned)"
        assert stat(remote["stats"][1], "SGL: answered by") == "tiny-ov-small (early exit)"
    calls = [json.loads(line) for line in calls_log.read_text().splitlines()]
    assert {c["mode"] for c in calls} == {mode}
    respond = [c["duration"] for c in calls if c["function"] == "respond"]
    assert respond[0] > respond[1] and all(0 < d <= 300 for d in respond)  # a first image gets the longer slot


@pytest.mark.parametrize("mode", ["strict", "reuse"])
def test_zerogpu_stop_and_clear(mode):
    proc = AppProcess("--model", "tiny-llava", "--ignore-eos", "--max-new-tokens", "20000", zerogpu=mode)
    try:
        c = Client(proc.url, verbose=False)
        history, _, _, _ = send(c, [], "", [CAT])
        history, stats, latency = stream_then_stop(c, history, "Talk for a long time.")
        assert "(stopped)" in stats and texts(history)[-1][1] and latency < 10
        history, stats, _ = stream_then_stop(c, history, "And now?")  # the session goes on, the image kept
        assert "(stopped)" in stats and stat(stats, "visual tokens to the LLM") == "64 of 576"
        c.predict(api_name="/clear")
        history, stats, sel, caption = send(c, [], "", [CAT])  # a new conversation in the same tab
        assert "64 of 576" in caption and sel is not None and "Ask a question to see timings" in stats
    finally:
        proc.close()


def test_gpu_handlers_fail_only_with_messages(tiny_llava, monkeypatch):
    """On ZeroGPU an exception other than gr.Error reaches the page as its bare class name, so the GPU
    handlers (respond, compare, the map's re-encode) report failures themselves and keep the state."""
    demo = app.build_demo(tiny_llava, max_new_tokens=4)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    try:
        c = Client(url, verbose=False)
        history, _, _, _ = send(c, [], "What is it?", [CAT], settings=("Full",) + VISIONZIP[1:])
        family = tiny_llava.family

        def broken(*args, **kwargs):
            raise RuntimeError("the tower broke")
        monkeypatch.setattr(family, "encode", broken)
        # a new method needs a new encode: the map's re-encode (a GPU handler) fails with a message
        _, caption, _ = c.predict("kept", *VISIONZIP, api_name="/settings_method")
        assert "Encoding the image failed: RuntimeError: the tower broke" in caption
        history, _, _, _ = send(c, history, "And now?")  # the answer says it, in the chat
        assert "Something went wrong: RuntimeError: the tower broke" in texts(history)[-1][1]
        table, *_ = c.predict(api_name="/compare")
        assert "RuntimeError: the tower broke" in table
        monkeypatch.undo()
        history, stats, _, _ = send(c, history, "Working again?")  # the state came back intact
        assert stat(stats, "visual tokens to the LLM") == "64 of 576" and len(texts(history)) >= 6
    finally:
        demo.close()


def test_runs_as_a_space_with_the_real_spaces_package(tmp_path):
    """`python app.py` as a Space starts it: SYSTEM=spaces, SPACE_ID and GRADIO_SERVER_NAME=0.0.0.0 set,
    the real `spaces` package installed (tests/requirements). What this covers: app.py and Gradio import the
    real package; Gradio, seeing a Space (its config carries the SPACE_ID), starts the `spaces` reload server
    on 0.0.0.0:7887 (Gradio 6.31 still serves the API page and its info there: seen, not assumed); the app
    starts, listens where the Space says and answers two turns off ZeroGPU (there `spaces.GPU` returns the
    handlers unchanged); its log, the one docs/spaces.md tells people to read, has no traceback. Not
    covered: ZeroGPU itself (Hugging Face's scheduler): the stand-ins above are."""
    import spaces
    assert not hasattr(spaces, "__zipchat_stand_in__") and "zerogpu" not in spaces.__file__
    log = tmp_path / "space.log"
    proc = AppProcess("--model", "tiny-llava", log=log, unset=("PYTHONPATH",),
                      env={"SYSTEM": "spaces", "SPACE_ID": "zipchat-tests/zipchat", "GRADIO_SERVER_NAME": "0.0.0.0"})
    try:
        assert listening_address(proc.port) == "0.0.0.0"
        c = Client(proc.url, verbose=False)
        history, stats, _, caption = send(c, [], "What is it?", [CAT])
        assert "64 of 576" in caption and texts(history)[-1][1]
        history, stats, _, _ = send(c, history, "And its colour?")
        assert stat(stats, "KV cache reused / size").startswith("yes")  # one process: the cache is kept
        assert listening_address(7887) == "0.0.0.0"  # the `spaces` reload server Gradio starts on a Space
        assert c.config["space_id"] == "zipchat-tests/zipchat"
    finally:
        proc.close()
    text = log.read_text()
    assert "Running on local URL:  http://0.0.0.0:" in text
    assert "Traceback" not in text and "Exception ignored" not in text and "Error" not in text, text
