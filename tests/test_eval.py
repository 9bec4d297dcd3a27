"""`python -m pipeline.eval` (issue 35, item 4) over datasets the test writes: the report is a recount of the
per-item file, an interrupted run resumes without redoing finished items, Full agrees with itself, a method's
answers are those of a fresh session, and the command line runs end to end (float32, tiny twins)."""

import json
import shutil

import pytest

from pipeline import ChatSession, eval as zeval
from pipeline.dataset import load_items
from pipeline.errors import InputError
from pipeline.scoring import vqa_accuracy, yes_no

ROWS = [
    {"id": "yn", "image": "cat.png", "question": "Is there a cat?", "answer": "yes"},
    {"id": "mc", "image": "cat.png", "question": "Which animal?", "choices": ["dog", "cat"], "answer": "B"},
    {"id": "vqa", "image": "coffee.png", "question": "What is it?", "answer": ["coffee", "cup", "coffee"]},
    {"id": "two", "image": "cat.png", "questions": ["What animal is it?", "What colour is it?"],
     "answers": ["cat", "black"]},
]


@pytest.fixture
def data(tmp_path):
    from tests.conftest import ROOT
    shutil.copy(ROOT / "assets" / "chelsea.png", tmp_path / "cat.png")
    shutil.copy(ROOT / "assets" / "coffee.png", tmp_path / "coffee.png")
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def test_items_and_their_kinds(data, tmp_path):
    items = load_items(str(data))
    assert [i.kind for i in items] == ["yes_no", "choice", "short", "short"]
    assert items[3].questions == ROWS[3]["questions"] and items[0].image == str(tmp_path / "cat.png")
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,image,question,answer,choices\n1,cat.png,Which?,A,cat|dog\n")
    (item,) = load_items(str(csv_path))
    assert item.choices == ["cat", "dog"] and item.kind == "choice"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "image": "cat.png", "questions": ["a", "b"], "answers": ["x"]}) + "\n")
    with pytest.raises(InputError):
        load_items(str(bad))


def test_eval_report_recounts_and_resumes(data, tmp_path, tiny_llava, monkeypatch):
    items = load_items(str(data))
    out = tmp_path / "out"
    ran = []
    real = zeval.run_item
    monkeypatch.setattr(zeval, "run_item", lambda *a, **k: ran.append((a[1].id, a[2], a[3])) or real(*a, **k))
    zeval.evaluate(tiny_llava, items[:2], ["visionzip", "fastv"], [16], out, max_new_tokens=3)
    assert len(ran) == 2 * 3
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:20])  # a line cut short
    ran.clear()
    rep = zeval.evaluate(tiny_llava, items, ["visionzip", "fastv"], [16], out, max_new_tokens=3)
    assert sorted(ran) == sorted([(i.id, m, b) for i in items[2:] for m, b in
                                  (("full", None), ("visionzip", 16), ("fastv", 16))])  # nothing redone
    records = zeval.read_results(out / "results.jsonl")
    assert len(records) == 4 * 3 and len({(r["id"], r["method"], r["budget"]) for r in records}) == 12
    for row in rep["rows"]:  # the report = a recount of the per-item file
        mine = [r for r in records if r["method"] == row["method"] and r["budget"] == row["budget"]]
        assert row["items"] == len(mine) == 4
        assert row["accuracy"] == pytest.approx(sum(r["turns"][0]["score"] for r in mine) / 4)
        assert row["turn2_accuracy"] == mine[[r["id"] for r in mine].index("two")]["turns"][1]["score"]
    full = [r for r in records if r["method"] == "full"]
    assert all(t["share"] == 1.0 and t["parting"] is None for r in full for t in r["turns"])
    for r in records:  # each turn's score, by hand
        item = next(i for i in items if i.id == r["id"])
        for t, ref in zip(r["turns"], item.answers):
            want = {"yes_no": lambda: float(yes_no(t["answer"]) == ref), "short": lambda: vqa_accuracy(t["answer"], ref)
                    }.get(item.kind, lambda: t["score"])()
            assert t["score"] == want
    vz = next(r for r in records if r["id"] == "two" and r["method"] == "visionzip")
    fresh = ChatSession(tiny_llava, method="visionzip", dominant=14, contextual=2, max_new_tokens=3)
    fresh.add_image(str(tmp_path / "cat.png"))
    assert [fresh.ask(q) for q in ROWS[3]["questions"]] == [t["answer"] for t in vz["turns"]]
    assert (out / "plot.png").stat().st_size > 0 and "| VisionZip | 16 | 4 |" in (out / "report.md").read_text()


def test_command_line(data, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = zeval.main([str(data), "--model", "tiny-llava", "--methods", "random", "--budgets", "8",
                     "--max-new-tokens", "2", "--out", str(out), "--limit", "2"])
    assert rc == 0 and "| Random | 8 | 2 |" in capsys.readouterr().out
    assert zeval.main([str(data), "--methods", "nope", "--out", str(out)]) == 2
    assert zeval.main([str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
