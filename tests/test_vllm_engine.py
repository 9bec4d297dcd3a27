"""The vLLM engine against a real vLLM server (started here on 127.0.0.1, stopped after). Runs in the vLLM
environment (requirements-vllm.txt); skipped where vLLM is not installed. float32 on both sides: greedy
answers equal zipchat's own decoder token for token."""

import os
import threading

import pytest
import torch
from PIL import Image

pytest.importorskip("vllm")

from pipeline import InputError, load_vlm  # noqa: E402
from pipeline.engines.vllm_launch import LocalVLLM  # noqa: E402
from pipeline.session import ChatSession  # noqa: E402

TWINS = ["tiny-llava-h32", "tiny-ov-h32", "tiny-internvl-h32"]
QUESTIONS = ["What is in the image?", "What colour is it?"]


@pytest.fixture(scope="module", params=TWINS)
def served(request, tmp_path_factory):
    vlm = load_vlm(request.param, dtype=torch.float32)
    root = tmp_path_factory.mktemp("vllm")
    server = LocalVLLM(vlm, root / vlm.name, max_model_len=8192, log=root / "server.log")
    yield vlm, server.engine
    server.stop()


def images():
    return [Image.new("RGB", (500, 380), (200, 30, 40)), Image.radial_gradient("L").convert("RGB").resize((300, 420))]


def conversation(vlm, engine, method="visionzip", tokens=16):
    """Two images, two turns each -> (answers, stats)."""
    session = ChatSession(vlm, method=method, max_new_tokens=tokens, engine=engine)
    answers, stats = [], []
    for image in images():
        session.add_image(image)
        for q in QUESTIONS:
            answers.append("".join(session.ask_stream(q)))
            stats.append(session.last_turn)
    return answers, stats


@pytest.mark.parametrize("method", ["visionzip", "full", "divprune", "hiprune"])
def test_greedy_answers_equal_the_transformers_engine(served, method):
    vlm, engine = served
    expected, _ = conversation(vlm, None, method)
    got, stats = conversation(vlm, engine, method)
    assert got == expected and all(got)
    assert all(t.engine == "vllm" for t in stats)
    # turn 2 on the same image: the first turn's blocks (the image's embeddings included) come from vLLM's cache
    assert stats[1].engine_cached_tokens >= 32 and stats[1].cache_reused
    assert stats[1].prefill_tokens < stats[1].prompt_tokens


def test_cdpruner_selects_again_and_answers_on_vllm(served):
    """CDPruner (selected again for every question, before the LLM) sends its tokens through vLLM as it does through
    zipchat's decoder: greedy answers equal over two images x two turns."""
    vlm, engine = served
    expected, _ = conversation(vlm, None, "cdpruner")
    got, stats = conversation(vlm, engine, "cdpruner")
    assert got == expected and all(got)
    assert all(t.engine == "vllm" for t in stats) and stats[1].images_encoded == 1  # turn 2: selected again


def test_a_method_registered_at_run_time_answers_on_vllm(served):
    """A compress-once method written in this test alone (tests/test_architecture.py's) answers on vLLM exactly as
    on zipchat's decoder."""
    from pipeline.methods import registry
    from tests.test_architecture import least_attended
    registry.register(registry.Method("least", "Least attended", registry.COMPRESS_ONCE, pick=least_attended))
    try:
        vlm, engine = served
        expected, _ = conversation(vlm, None, "least")
        got, stats = conversation(vlm, engine, "least")
        assert got == expected and all(got) and all(t.engine == "vllm" for t in stats)
    finally:
        registry.unregister("least")


def test_streams_token_by_token_and_stops(served):
    vlm, engine = served
    session = ChatSession(vlm, method="visionzip", max_new_tokens=40, stop_at_eos=False, engine=engine)
    session.add_image(images()[0])
    deltas = []
    for delta in session.ask_stream("Describe it."):
        deltas.append(delta)
        if len(deltas) == 3:
            session.stop()
    t = session.last_turn
    assert t.stopped and 3 <= t.new_tokens <= 4 and len(deltas) <= 4
    full = ChatSession(vlm, method="visionzip", max_new_tokens=40, stop_at_eos=False)
    full.add_image(images()[0])
    assert full.ask("Describe it.").startswith("".join(deltas))  # the partial answer is the answer's beginning
    assert session.ask("And now?")  # the session goes on after a Stop


def test_the_window_is_the_servers(served):
    vlm, engine = served
    session = ChatSession(vlm, engine=engine)
    assert session.context_window == engine.max_model_len() == 8192 < vlm.context_window


def test_eight_concurrent_sessions_are_isolated(served):
    vlm, engine = served
    colours = [(255 * (i & 1), 255 * (i >> 1 & 1), 255 * (i >> 2 & 1)) for i in range(8)]
    def ask(colour, engine):
        s = ChatSession(vlm, method="visionzip", max_new_tokens=12, engine=engine)
        s.add_image(Image.new("RGB", (400, 300), colour))
        return [s.ask(q) for q in QUESTIONS]
    sequential = [ask(c, None) for c in colours]
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(colours[i], engine))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_fastv_answers_asked_together_equal_sequential_ones(served):
    """The app answers several requests at once on this engine: FastV's hooks on the shared language model
    must not see another answer's layers (the model's answer lock keeps zipchat's decoder one at a time)."""
    from concurrent.futures import ThreadPoolExecutor
    vlm, engine = served

    def ask(colour):
        s = ChatSession(vlm, method="fastv", max_new_tokens=8, engine=engine)
        s.add_image(Image.new("RGB", (400, 300), colour))
        return s.ask("Hi"), s.last_turn.engine
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    sequential = [ask(c) for c in colours]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, colours)) == sequential
    assert {e for _, e in sequential} == {"transformers"}


def test_bad_embeddings_never_reach_the_engine(served):
    vlm, engine = served
    session = ChatSession(vlm, method="visionzip", max_new_tokens=8, engine=engine)
    comp = session.add_image(images()[0])
    good = comp.features
    comp.features = torch.where(torch.arange(len(good))[:, None] == 5, float("nan"), good)
    with pytest.raises(InputError, match="NaN"):
        session.ask("Hi")
    comp.features = good[:, :-1]
    with pytest.raises(InputError, match="shape"):
        session.ask("Hi")
    comp.features = good
    assert session.ask("Hi")  # nothing was recorded, the session answers
    assert len(session.state.turns) == 1


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_llm_methods_stay_on_transformers(served, method):
    vlm, engine = served
    session = ChatSession(vlm, method=method, max_new_tokens=8, engine=engine)
    session.add_image(images()[0])
    session.ask("Hi")
    assert session.last_turn.engine == "transformers"


@pytest.mark.browser
def test_eval_and_compare_agreement_on_vllm(served, tmp_path):
    """`python -m pipeline.eval --vllm-url`: the items answered on vLLM equal those answered on zipchat's decoder
    (the same answers, scores and agreement with Full, which is scored on zipchat's decoder either way); Compare's
    agreement columns on a session answering on vLLM equal those on zipchat's decoder."""
    import json
    from pipeline.compare import compare
    from pipeline.dataset import load_items
    from pipeline.eval import evaluate, read_results
    vlm, engine = served
    images()[0].save(tmp_path / "red.png")
    rows = [{"id": "yn", "image": "red.png", "question": "Is it red?", "answer": "yes"},
            {"id": "two", "image": "red.png", "questions": ["What is it?", "What colour?"], "answers": ["box", "red"]}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(str(tmp_path / "items.jsonl"))
    for name, e in (("mine", None), ("vllm", engine)):
        evaluate(vlm, items, ["visionzip", "divprune"], [32], tmp_path / name, 8, e)
    mine, on_vllm = (read_results(tmp_path / name / "results.jsonl") for name in ("mine", "vllm"))
    assert len(mine) == len(on_vllm) == 2 * 3  # Full, VisionZip and DivPrune per item
    for a, b in zip(mine, on_vllm):
        assert (a["id"], a["method"]) == (b["id"], b["method"]) and a["turns"]
        assert [t["answer"] for t in a["turns"]] == [t["answer"] for t in b["turns"]]
        for x, y in zip(a["turns"], b["turns"]):
            assert x["score"] == y["score"] and x["share"] == pytest.approx(y["share"], abs=1e-4)
    shares = []
    for e in (None, engine):
        s = ChatSession(vlm, method="visionzip", max_new_tokens=8, engine=e)
        s.add_image(images()[0])
        s.ask(QUESTIONS[0])
        shares.append([t.agreement.share for _, _, t in compare(s, ["full", "visionzip"])])
    assert shares[0][0] == shares[1][0] == 1.0 and shares[0] == pytest.approx(shares[1], abs=1e-4)


def test_a_clip_answers_on_vllm(served, tmp_path):
    """A clip (LLaVA-OneVision: 4 frames, each a crop) answers on vLLM from the same prompt embeddings as on
    zipchat's decoder: greedy answers equal over two turns, Full and VisionZip; other families refuse it."""
    from tests.test_video import write_clip
    vlm, engine = served
    path = write_clip(tmp_path / "squares.mp4", frames=30)
    if not vlm.family.takes_video:
        with pytest.raises(InputError, match="not video"):
            ChatSession(vlm, method="full", engine=engine).add_video(path)
        return
    for method in ("full", "visionzip"):
        answers = []
        for e in (None, engine):
            s = ChatSession(vlm, method=method, max_new_tokens=12, engine=e)
            s.add_video(path, num_frames=4)
            answers.append([s.ask(q) for q in QUESTIONS])
            assert (s.last_turn.engine == "vllm") == (e is not None)
        assert answers[0] == answers[1] and all(answers[0])


def test_the_app_in_chromium_and_two_clients_at_once(tmp_path):
    """`python app.py --engine vllm` (it starts its own vLLM server): a conversation in Chromium streams its
    answers from vLLM, says so, and turn 2 hits vLLM's prefix cache; two API clients answered together get
    what each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from tests.appclient import CAT, AppProcess, send, stat, texts
    from tests.test_browser import CHROMIUM, ask, open_page, upload_and_ask, wait_until_textbox_is_back  # noqa: F401

    app = AppProcess("--engine", "vllm", "--model", "tiny-ov-h32", "--max-new-tokens", "24", timeout=600,
                     log=tmp_path / "app.log")
    try:
        with open_page(app.url, 1500, 1000) as page:
            assert "Engine: vLLM" in page.locator("#engine-note").inner_text()
            stats = page.locator("#stats")
            upload_and_ask(page, "What is it?")
            page.wait_for_function("() => document.querySelector('#stats').innerText.includes('vLLM (the image')",
                                   timeout=120_000)
            wait_until_textbox_is_back(page)
            assert page.locator("#chatbot .message.bot").last.inner_text().strip()
            ask(page, "And its colour?")
            page.wait_for_function("() => document.querySelectorAll('#chatbot .message.bot').length >= 2 && "
                                   "!document.querySelector('#textbox textarea').disabled", timeout=120_000)
            page.wait_for_function("() => /prefix cache\\)\\s*yes: [1-9]/.test(document.querySelector('#stats')"
                                   ".innerText)", timeout=30_000)
            assert "vLLM" in stats.inner_text()
            # what vLLM serves is what the stats say: the export it was started on is stamped with that dtype
            import json
            from pipeline.tiny import tiny_cache_dir
            stamp = json.loads((tiny_cache_dir().parent / "vllm" / "tiny-ov-h32" / "zipchat_export.json").read_text())
            import re
            said = re.search(r"vLLM \(the image encoded on [^,]+, (\w+)\)", stats.inner_text())
            assert said and said.group(1) == stamp["dtype"], (stats.inner_text(), stamp)
            page.screenshot(path=str(tmp_path / "vllm.png"))

        def conversation(_):
            client = Client(app.url, verbose=False)
            history, stats, *_ = send(client, [], "What is in the image?", [CAT])
            history, stats2, *_ = send(client, history, "What colour is it?")
            return texts(history), stat(stats, "engine"), stat(stats2, "KV cache reused (vLLM prefix cache)")
        alone = conversation(0)
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(conversation, range(2)))
        assert [t[0] for t in together] == [alone[0], alone[0]]  # (how much the cache held differs: not compared)
        for answers, engine, cache in [alone, *together]:
            assert engine.startswith("vLLM") and cache.startswith("yes")
    finally:
        app.close()


def vllm_group(port: int) -> int | None:
    """The process group of the vLLM server listening on `port` (its OpenAI server leads it), or None."""
    from pathlib import Path
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"vllm.entrypoints.openai.api_server" in b" ".join(argv) and str(port).encode() in argv:
                return os.getpgid(int(proc.name))
        except (OSError, ValueError):
            continue
    return None


def group_members(group: int) -> list:
    from pathlib import Path
    members = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group:
                stat = (proc / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # (a zombie is gone but for its exit status)
                    members.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return members


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_the_vllm_server_never_outlives_the_app(tmp_path, how):
    """`python app.py --engine vllm` started its own server: whatever ends the app (SIGTERM from Docker, systemd
    or a Space's restart; SIGHUP; a SIGKILL, where only the kernel's parent-death signal can act), the server and
    its engine processes are gone within 15 s and the port is free again."""
    import re
    import signal
    import socket
    import time

    from tests.appclient import AppProcess
    log = tmp_path / "app.log"
    app = AppProcess("--engine", "vllm", "--model", "tiny-ov-h32", timeout=600, log=log)
    group = None
    try:
        deadline = time.time() + 60  # (the app answers on its port once its server is up: the line is written)
        while not re.search(r"vLLM engine: http://127\.0\.0\.1:(\d+)", log.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        port = int(re.search(r"vLLM engine: http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        group = vllm_group(port)
        assert group is not None and group_members(group)
        os.kill(app.process.pid, getattr(signal, how))
        deadline = time.time() + 15
        while time.time() < deadline and group_members(group):
            time.sleep(0.2)
        assert group_members(group) == [], f"still running after {how}: {group_members(group)}"
        with socket.socket() as s:
            # the port is free to listen on again: SO_REUSEADDR (which uvicorn and vLLM set) lets a bind pass the
            # TIME_WAIT entries the server's closed connections leave, and fails only while something still listens
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        app.close()
        if group is not None and group_members(group):
            os.killpg(group, signal.SIGKILL)
