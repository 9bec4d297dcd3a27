"""Budget sweep and export (issue 35, items 2 and 3): one tower pass per image across budgets and methods, each
point = a fresh session at that budget, Full's point agrees with itself, the plot has a line per method (figure
data), and the JSON and CSV files round-trip (float32, tiny twins)."""

import csv
import json

import pytest

from pipeline import ChatSession, InputError
from pipeline import compress
from pipeline.compare import compare
from pipeline.export import compare_record, save_plot, sweep_figure, sweep_record, write_files
from pipeline.sweep import budget_settings, sweep

Q = "What is in the image?"


@pytest.fixture
def asked(tiny_ov_large, photo):
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=4)
    s.add_image(photo)
    s.ask(Q)
    return s


def test_sweep_shares_one_tower_pass_and_matches_fresh_sessions(asked, tiny_ov_large, photo, monkeypatch):
    calls = []
    real = compress.encode_distinct
    monkeypatch.setattr(compress, "encode_distinct", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = sweep(asked, ["visionzip", "divprune", "fastv"], [16, 64])
    assert len(calls) == 1 and result.tower_passes == 1  # one tower pass for 4 compressed points (one image)
    assert [(p.method, p.budget) for p in result.points] == [
        ("full", None), ("visionzip", 16), ("visionzip", 64), ("divprune", 16), ("divprune", 64), ("fastv", 16),
        ("fastv", 64)]
    full = result.points[0]
    assert full.agreement.share == 1.0 and full.agreement.parting is None and full.agreement.f1 == 1.0
    for p in result.points[1:]:
        settings = budget_settings(asked, p.method, p.budget)
        fresh = ChatSession(tiny_ov_large, method=p.method, max_new_tokens=4, **settings)
        fresh.add_image(photo)
        assert fresh.ask(Q) == p.answer, (p.method, p.budget)
        assert p.agreement is not None and p.agreement.tokens == full.agreement.tokens
    crops = len(asked.compression(asked.state.last_image_key, method="full").crops)
    assert [p.visual_tokens for p in result.points[1:5]] == [16 * crops, 64 * crops] * 2
    assert len(asked.state.turns) == 1  # the conversation is unchanged


def test_sweep_refuses_bad_budgets_and_notes_a_budget_too_large(asked):
    for bad in ("64", [], [0], [2.5], [True], None.__class__):
        with pytest.raises(InputError):
            sweep(asked, ["visionzip"], bad)
    with pytest.raises(InputError):
        sweep(asked, ["manual"], [16])
    result = sweep(asked, ["visionzip"], [100_0])
    assert result.points[1].note and "larger than" in result.points[1].note and result.points[1].agreement is None


def test_plot_has_a_line_per_method_and_exports_round_trip(asked, tmp_path):
    result = sweep(asked, ["visionzip", "fastv"], [16, 32])
    fig = sweep_figure(result)
    agree, speed = fig.axes
    labels = [line.get_label() for line in agree.get_lines()]
    assert labels == ["VisionZip", "FastV", "Full"]
    vz = agree.get_lines()[0]
    assert list(vz.get_xdata()) == sorted(p.visual_tokens for p in result.points if p.method == "visionzip")
    assert list(speed.get_lines()[1].get_ydata()) == [p.ttft_s * 1000 for p in sorted(
        (p for p in result.points if p.method == "fastv"), key=lambda p: p.visual_tokens)]
    png = save_plot(result, tmp_path / "sweep.png")
    from PIL import Image
    assert Image.open(png).size == (900, 400)
    record = sweep_record(asked, result)
    json_path, csv_path = write_files(record, tmp_path, "sweep")
    loaded = json.loads(open(json_path).read())
    assert loaded == json.loads(json.dumps(record))
    assert [r["agreement_share"] for r in loaded["rows"]] == [p.agreement.share for p in result.points]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ttft_s"]) for r in rows] == [p.ttft_s for p in result.points]


def test_compare_export_round_trips(asked, tmp_path):
    results = compare(asked, ["visionzip", "full"])
    record = compare_record(asked, results)
    loaded = json.loads(open(write_files(record, tmp_path, "compare")[0]).read())
    by_method = {r["method"]: r for r in loaded["rows"]}
    for method, answer, t in results:
        assert by_method[method]["answer"] == answer and by_method[method]["ttft_s"] == t.ttft_s
        assert by_method[method]["agreement_share"] == t.agreement.share
    kept = asked.compression(asked.state.last_image_key, method="visionzip").crops
    assert by_method["visionzip"]["kept_units"]["0"] == sorted(set(kept[0].kept.tolist()) | {
        int(t) for t in kept[0].targets if t >= 0})
    assert by_method["full"]["kept_units"] is None
    assert loaded["versions"]["torch"] and loaded["settings"]["method"] == "visionzip"
