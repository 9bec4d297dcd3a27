"""The app as a Hugging Face Space runs it: `python app.py` with the Space's environment, and on
ZeroGPU, where every GPU call runs in another process (tests/zerogpu/spaces: a stand-in that
forks a child per call, pickles arguments and results, and refuses models)."""

import importlib.util
import json
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


def load_stub():
    spec = importlib.util.spec_from_file_location("zerogpu_stub", ROOT / "tests" / "zerogpu" / "spaces" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stub_runs_calls_in_another_process_and_refuses_models():
    spaces = load_stub()
    seen = []

    @spaces.GPU(duration=5)
    def change(items):
        items.append(1)  # in place: lost, as on ZeroGPU
        return len(items)

    assert change(seen) == 1 and seen == []
    with pytest.raises(pickle.PicklingError, match="Linear"):
        spaces.GPU(duration=5)(lambda m: 0)(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="Linear"):  # and nothing comes back holding one either
        spaces.GPU(duration=5)(lambda: torch.nn.Linear(2, 2))()

    @spaces.GPU(duration=lambda n: n)
    def count(n):
        for i in range(n):
            yield i

    assert list(count(3)) == [0, 1, 2]
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


@pytest.mark.parametrize("pair", [False, True], ids=["llava", "sgl-ov-pair"])
def test_zerogpu_answers_equal_in_process(pair, tiny_llava, tiny_ov, tiny_ov_large, zerogpu_log):
    model, small, tokens = (tiny_ov_large, tiny_ov, 6) if pair else (tiny_llava, None, 8)
    demo = app.build_demo(model, max_new_tokens=tokens, small=small)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    try:
        local = scenario(url, sgl=pair)
    finally:
        demo.close()
    proc = AppProcess("--model", model.name, "--max-new-tokens", str(tokens), zerogpu=True,
                      env={"ZEROGPU_STUB_LOG": str(zerogpu_log)})
    try:
        remote = scenario(proc.url, sgl=pair)
    finally:
        proc.close()
    assert remote["answers"] == local["answers"] and len(local["answers"]) == (2 if pair else 3)
    assert remote["compare"] == local["compare"] and remote["caption"] == local["caption"]
    for a, b in zip(local["stats"], remote["stats"]):
        assert stat(a, "visual tokens to the LLM") == stat(b, "visual tokens to the LLM")
    # in-process the KV cache is reused; on ZeroGPU each turn prefills the conversation again
    # (images stay compressed: encoded once, in the first turn, and carried in the state)
    assert stat(local["stats"][1], "KV cache reused / size").startswith("yes")
    assert stat(remote["stats"][1], "KV cache reused / size").startswith("no")
    assert stat(remote["stats"][1], "image") == "re-used (compressed once)"
    if pair:
        assert stat(remote["stats"][0], "SGL: answered by") == "tiny-ov-large (large model, pruned)"
        assert stat(remote["stats"][1], "SGL: answered by") == "tiny-ov-small (early exit)"
    calls = [json.loads(line) for line in zerogpu_log.read_text().splitlines()]
    respond = [c["duration"] for c in calls if c["function"] == "respond"]
    assert respond[0] > respond[1] and all(0 < d <= 300 for d in respond)  # a first image gets the longer slot


def test_zerogpu_stop_and_clear():
    proc = AppProcess("--model", "tiny-llava", "--ignore-eos", "--max-new-tokens", "20000", zerogpu=True)
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
