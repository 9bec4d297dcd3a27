"""Event-level tests: the app launched in-process on the tiny models, driven with gradio_client."""

import time

import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from tests.appclient import CAT, VISIONZIP, compare_rows, resend, send, stat, texts  # noqa: E402


@pytest.fixture(scope="module")
def url(tiny_llava):
    demo = app.build_demo(tiny_llava, banner="offline", max_new_tokens=6)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def test_upload_and_two_turns(url):
    c = Client(url, verbose=False)
    history, stats, sel, caption = send(c, [], "What animal is this?", [CAT])
    assert "64 of 576 visual tokens" in caption and sel.endswith((".png", ".webp", ".jpeg", ".jpg"))
    assert texts(history)[-1][0] == "assistant" and texts(history)[-1][1]
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and stat(stats, "image") == "1 encoded"
    assert stat(stats, "KV cache reused / size").startswith("no")
    history, stats, _, _ = send(c, history, "And its colour?")
    assert stat(stats, "KV cache reused / size").startswith("yes") and "re-used (compressed once)" in stats
    assert [r for r, _ in texts(history)] == ["user", "assistant", "user", "assistant"]


def test_image_first_then_question(url):
    c = Client(url, verbose=False)
    history, stats, sel, caption = send(c, [], "", [CAT])  # no question yet: the image is encoded, the maps show
    assert "64 of 576" in caption and sel is not None
    assert "Now ask a question" in texts(history)[-1][1] and "Ask a question to see timings" in stats
    history, stats, _, _ = send(c, history, "What is it?")
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and stat(stats, "image") == "re-used (compressed once)"


def test_method_switch_applies_next_turn(url):
    c = Client(url, verbose=False)
    history, stats, _, _ = send(c, [], "What is it?", [CAT])
    shown, caption, _ = c.predict("scores", "Full", 54, 10, 0.35, 0.4, True, 0.8, False, api_name="/settings_method")
    assert "all 576 visual tokens" in caption and shown  # (full has no scores: the kept view is drawn)
    history, stats, _, _ = send(c, history, "Again?", settings=("Full",) + VISIONZIP[1:])
    assert stat(stats, "visual tokens to the LLM") == "576 of 576" and stat(stats, "image") == "re-used (compressed once)"
    shown, caption, _ = c.predict("kept", "VisionZip", 108, 20, 0.35, 0.4, True, 0.8, False,
                                  api_name="/settings_dominant")
    assert "108 dominant + 20 contextual = 128 of 576" in caption


@pytest.mark.parametrize("method", ["VisionZip", "Full"])
def test_compare(url, method):
    c = Client(url, verbose=False)
    send(c, [], "What is it?", [CAT], settings=(method,) + VISIONZIP[1:])
    table, answers, maps, overlap, files = c.predict(api_name="/compare")  # called as before this had a method choice
    assert len(maps) == 2 and "kept overlap" not in overlap  # (Full has no kept set of its own)
    if method == "VisionZip":
        assert [(m, cells[0]) for m, cells in compare_rows(table).items()] == [("VisionZip", "64"), ("Full", "576")]
        assert answers.startswith("**VisionZip:**") and "\n\n**Full:**" in answers
    else:  # Full against Full would compare nothing: it compares with VisionZip instead
        assert [(m, cells[0]) for m, cells in compare_rows(table).items()] == [("Full", "576"), ("VisionZip", "64")]
        assert answers.startswith("**Full:**") and "\n\n**VisionZip:**" in answers


def test_compare_any_set_of_methods(url):
    """Compare with a chosen set (UI labels or method names): one column, answer and map per method, and
    the Jaccard overlap of the kept sets (Pool and Full have none)."""
    c = Client(url, verbose=False)
    send(c, [], "What is it?", [CAT], settings=VISIONZIP)
    chosen = ["visionzip", "divprune", "vispruner", "random", "pool", "fastv", "full"]
    table, answers, maps, overlap, files = c.predict(chosen, api_name="/compare")
    rows = compare_rows(table)
    assert list(rows) == ["VisionZip", "DivPrune", "VisPruner", "Random", "Pool", "FastV", "Full"]
    assert [cells[0] for cells in rows.values()] == ["64"] * 5 + ["288 from layer 1 (576 below)", "576"]
    assert [m["caption"].split(":")[0] for m in maps] == ["VisionZip", "DivPrune", "VisPruner", "Random", "Pool",
                                                          "FastV", "Full"]
    assert all(answers.count(f"**{m}:**") == 1 for m in ("VisionZip", "DivPrune", "FastV", "Full"))
    rows = [r for r in overlap.splitlines() if r.startswith("| ")]
    assert rows[0].split(" | ")[1:] == ["VisionZip", "DivPrune", "VisPruner", "Random", "FastV |"]
    matrix = [r.strip("| ").split(" | ")[1:] for r in rows[1:]]
    assert [matrix[i][i] for i in range(5)] == ["1.00"] * 5 and not any(r.startswith("| Pool") for r in rows)
    assert "Not in the overlap: Pool keeps no patch as itself" in overlap and "Full keeps every patch" in overlap
    assert all(matrix[i][j] == matrix[j][i] for i in range(5) for j in range(5))
    # the files: JSON and CSV of the results (the table's numbers), a PNG per map
    import json
    names = [f.rsplit("/", 1)[-1] for f in files]
    assert names[:2] == ["compare.json", "compare.csv"] and len([n for n in names if n.endswith(".png")]) == 7
    record = json.loads(open(files[0]).read())
    assert [r["label"] for r in record["rows"]] == list(compare_rows(table))
    assert [str(r["visual_tokens"]) for r in record["rows"][:5]] == ["64"] * 5
    full = record["rows"][-1]
    assert full["agreement_share"] == 1.0 and full["agreement_parting"] is None
    cells = compare_rows(table)["Full"]
    assert cells[6:] == ["1.00", f"{full['agreement_logprob']:.2f}", "never", "1.00"], cells
    for bad in (["nope"], ["sgl"], "visionzip"):  # (no small model here: no SGL)
        try:
            table, *_ = c.predict(bad, api_name="/compare")
        except Exception as e:  # Gradio's own check of the choices, with its message
            assert "not in the list of choices" in str(e) or "must be a list" in str(e), e
        else:
            assert table.startswith("⚠️"), table
    history, stats, _, _ = send(c, [], "And now?")  # the conversation goes on, on its own method and cache
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and stat(stats, "KV cache reused / size").startswith("yes")


def test_sweep_through_the_api(url):
    """The budget sweep: a table with Full and each method x budget, the plot, the files; bad budgets are a
    message; the conversation goes on."""
    import json
    from PIL import Image
    c = Client(url, verbose=False)
    send(c, [], "What is it?", [CAT], settings=VISIONZIP)
    table, plot, files = c.predict(["visionzip", "fastv"], [16, 32], api_name="/sweep")
    lines = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split(" | ")[0:2] for r in lines] == [["| Full", "all"], ["| VisionZip", "16"], ["| VisionZip", "32"],
                                                   ["| FastV", "16"], ["| FastV", "32"]]
    assert "the vision tower ran 1 time(s) for 4 compressed point(s)" in table
    assert Image.open(plot).size == (900, 400)
    record = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert [(r["method"], r["budget"]) for r in record["rows"]] == [("full", None), ("visionzip", 16), ("visionzip", 32),
                                                                    ("fastv", 16), ("fastv", 32)]
    assert record["rows"][1]["visual_tokens"] == 16 and record["tower_passes"] == 1
    for bad in ([0], ["x"], "16"):
        try:
            table, *_ = c.predict(["visionzip"], bad, api_name="/sweep")
        except Exception as e:  # Gradio's own check of the choices
            assert "not in the list of choices" in str(e) or "must be a list" in str(e), e
        else:
            assert table.startswith("⚠️"), table
    history, stats, _, _ = send(c, [], "And now?")
    assert stat(stats, "KV cache reused / size").startswith("yes")


def test_bad_uploads_are_messages(url, tmp_path):
    from tests.conftest import ROOT
    c = Client(url, verbose=False)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes((ROOT / "assets" / "chelsea.png").read_bytes()[:5000])
    fake = tmp_path / "notes.jpg"
    fake.write_text("not really a picture")
    history, stats, _, _ = send(c, [], "What is it?", [str(corrupt), str(fake)])
    messages = [t for _, t in texts(history)]
    assert any("corrupt or truncated" in m for m in messages)
    assert any("not an image" in m for m in messages)
    history = c.predict(resend(history), {"text": "", "files": []}, *VISIONZIP, api_name="/add_message")[0]
    assert "Please type a question" in texts(history)[-1][1]
    history, stats, _, caption = send(c, history, "Now this one?", [CAT])  # the session goes on
    assert "64 of 576" in caption and stat(stats, "visual tokens to the LLM") == "64 of 576"


def test_two_sessions_stay_separate(url):
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    history_a, stats_a, _, _ = send(a, [], "What animal?", [CAT])
    history_b, stats_b, sel_b, caption_b = send(b, [], "Hello, no image here")
    assert stat(stats_b, "visual tokens to the LLM") == "0 of 0" and sel_b is None
    assert "Upload an image" in caption_b and "No image in this conversation yet" in texts(history_b)[-1][1]
    history_a, stats_a, _, _ = send(a, history_a, "And now?")
    assert stat(stats_a, "KV cache reused / size").startswith("yes") and "64 of 576" in stats_a
    b.predict(api_name="/clear")
    history_a, stats_a, _, _ = send(a, history_a, "Still there?")  # clearing B leaves A alone
    assert stat(stats_a, "KV cache reused / size").startswith("yes")


@pytest.fixture(scope="module")
def sgl_url(tiny_ov, tiny_ov_large):
    demo = app.build_demo(tiny_ov_large, max_new_tokens=5, small=tiny_ov)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    yield local_url
    demo.close()


def test_sgl_turns_show_guidance(sgl_url):
    c = Client(sgl_url, verbose=False)
    sgl = ("SGL", 54, 10, 0.2, 0.5, False, 0.8, False)  # early exit off
    history, stats, _, _ = send(c, [], "What is it?", [CAT], settings=sgl)
    assert stat(stats, "SGL: answered by") == "tiny-ov-large (large model, pruned)"
    assert "from layer 2" in stat(stats, "SGL: large model keeps")
    importance, _ = c.predict("importance", api_name="/view")
    assert importance is not None  # the small model's importance map
    # early exit at threshold 0: the small model answers, the large one is not run
    history, stats, _, _ = send(c, history, "And now?", settings=sgl[:5] + (True, 0.0, False))
    assert stat(stats, "SGL: answered by") == "tiny-ov-small (early exit)" and stat(stats, "SGL: large model") == "not run"
    table, answers, maps, overlap, files = c.predict(api_name="/compare")
    assert list(compare_rows(table)) == ["SGL", "VisionZip", "Full"] and answers.startswith("**SGL:**")
    assert "| SGL |" in overlap and "| VisionZip |" in overlap


def stream_then_stop(c, history, text):
    """Ask, let a few tokens stream, press Stop; -> the final (history, stats) of the turn."""
    history = c.predict(resend(history), {"text": text, "files": []}, *VISIONZIP, api_name="/add_message")[0]
    job = c.submit(resend(history), api_name="/respond")
    deadline = time.time() + 60
    while len(job.outputs()) < 5 and time.time() < deadline:  # a few streamed updates
        time.sleep(0.05)
    pressed = time.time()
    c.predict(api_name="/stop")
    deadline = time.time() + 30
    while not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert job.done(), "Stop did not end the generation"
    history, stats = job.outputs()[-1][:2]
    return history, stats, time.time() - pressed


def test_stop_ends_generation_and_the_session_goes_on(tiny_llava):
    # no stop token and a huge budget: only the Stop button can end these answers
    demo = app.build_demo(tiny_llava, max_new_tokens=20000, session_options={"stop_at_eos": False})
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1")
    try:
        c = Client(url, verbose=False)
        history = c.predict([], {"text": "", "files": [handle_file(CAT)]}, *VISIONZIP, api_name="/add_message")[0]
        history = c.predict(resend(history), api_name="/respond")[0]
        history, stats, _ = stream_then_stop(c, history, "Talk for a long time.")
        assert "(stopped)" in stats and texts(history)[-1][1]
        first_prompt = int(stat(stats, "prompt tokens (computed this turn)").split()[0])
        new_tokens = int(stat(stats, "decode").split()[0])
        assert 0 < new_tokens < 20000
        # the generation ended and released the session: the next question runs on top of the reused
        # KV cache, with the stopped turn's partial answer in its context
        history, stats, _ = stream_then_stop(c, history, "And now?")
        assert stat(stats, "KV cache reused / size").startswith("yes") and "(stopped)" in stats
        assert int(stat(stats, "prompt tokens (computed this turn)").split()[0]) > first_prompt + new_tokens
    finally:
        demo.close()


def test_a_handler_runs_alone_without_a_server(tiny_llava):
    """The handlers are plain methods (ui/handlers.py): a message, its answer and a Compare, called directly."""
    from ui.handlers import Handlers
    h = Handlers(tiny_llava, max_new_tokens=3)
    history, _, state, _ = h.add_message([], {"text": "What is it?", "files": [CAT]}, None, *VISIONZIP)
    *_, last = h.respond(history, state, "kept")
    history, state, stats, shown, caption, _ = last
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and "64 of 576" in caption and shown is not None
    *_, (table, answers, maps, overlap, files) = h.compare_answers(state, ["divprune", "pool", "full"])  # (it streams)
    assert list(compare_rows(table)) == ["DivPrune", "Pool", "Full"] and len(maps) == 3 and answers.count("**") == 6
    assert "needs two methods" in overlap  # DivPrune alone keeps units as themselves here
