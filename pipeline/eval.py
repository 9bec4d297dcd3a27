"""`python -m pipeline.eval DATA --model M --methods visionzip,fastv --budgets 64,128 --out DIR`: methods x
budgets over a dataset (dataset.py), scored as the benchmarks do (scoring.py) and against Full (agreement.py).

Per item, Full answers first (the reference), then each method at each budget, each in a conversation of its
own over the item's turns (a multi-turn item: turn 2 asked after the method's own turn-1 answer). Per turn:
the answer, its score, its agreement with Full's answer at the same turn (Full's answer scored under the
method, in the method's conversation), the visual tokens and the time to first token. Each (item, method,
budget) is appended to DIR/results.jsonl as it finishes: an interrupted run started again skips what is there.
The report (DIR/report.md, report.json, plot.png) is recounted from that file alone.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from .agreement import agreement_of, forced_logprobs, mean
from .dataset import load_items
from .errors import InputError
from .methods import registry
from .scoring import choice_letter, vqa_accuracy, yes_no
from .session import ChatSession
from .sweep import budget_settings, checked_budgets


def score(kind: str, prediction: str, reference, choices: list) -> float:
    """1.0 / 0.0 (VQA's accuracy may be a fraction) for one turn's answer."""
    if kind == "yes_no":
        return float(yes_no(prediction) == str(reference).strip().lower())
    if kind == "choice":
        ref = choice_letter(str(reference), choices) or str(reference).strip()
        return float(choice_letter(prediction, choices) == ref)
    return vqa_accuracy(prediction, reference)


def run_item(vlm, item, method: str, budget: int | None, full: dict | None, max_new_tokens: int, engine=None) -> dict:
    """One item answered by `method` at `budget` -> its record (`full`: Full's record of the item, or None when
    this is Full's own run)."""
    session = ChatSession(vlm, method="full", max_new_tokens=max_new_tokens, engine=engine)
    session.add_image(item.image, compress=False)
    settings = {} if budget is None else budget_settings(session, method, budget)
    session.set_method(method, **settings)
    turns, t0 = [], time.perf_counter()
    for n, (question, reference) in enumerate(zip(item.questions, item.answers)):
        answer = session.ask(question)
        t = session.last_turn
        g = t.guidance
        ref_turn = full["turns"][n] if full is not None else None
        full_ids = ref_turn["ids"] if ref_turn is not None else t.answer_ids
        lps = forced_logprobs(session, method, full_ids, **settings)
        a = agreement_of(answer, t.answer_ids, lps, ref_turn["answer"] if ref_turn else answer, full_ids,
                         ref_turn["logprob"] if ref_turn else mean(lps))
        turns.append({"question": question, "answer": answer, "ids": t.answer_ids,
                      "score": score(item.kind, answer, reference, item.choices), "logprob": a.logprob,
                      "share": a.share, "parting": a.parting, "f1": a.f1, "ttft_s": t.ttft_s,
                      "visual_tokens": len(g.kept) if g is not None and not t.early_exit else t.visual_tokens})
    return {"id": item.id, "method": method, "budget": budget, "kind": item.kind, "turns": turns,
            "seconds": time.perf_counter() - t0}


def read_results(path: Path) -> list:
    """The records of results.jsonl (a line cut short by an interruption is left out)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def evaluate(vlm, items: list, methods: list, budgets: list, out_dir, max_new_tokens: int = 16, engine=None,
             progress=None) -> dict:
    """Run what results.jsonl in `out_dir` lacks, then write the report -> the report (see `report`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    records = read_results(path)
    done = {(r["id"], r["method"], r["budget"]) for r in records}
    fulls = {r["id"]: r for r in records if r["method"] == "full"}
    runs = [("full", None)] + [(m, b) for m in methods if m != "full" for b in budgets]
    with path.open("a", encoding="utf-8") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # (after a line an interruption cut short: it is left out, the next starts afresh)
        for item in items:
            for method, budget in runs:
                if (item.id, method, budget) in done:
                    continue
                try:
                    record = run_item(vlm, item, method, budget, fulls.get(item.id), max_new_tokens, engine)
                except InputError as e:  # (a budget above a crop's tokens: recorded, not retried)
                    record = {"id": item.id, "method": method, "budget": budget, "kind": item.kind, "turns": [],
                              "seconds": 0.0, "note": str(e)}
                if method == "full":
                    fulls[item.id] = record
                f.write(json.dumps(record) + "\n")
                f.flush()
                if progress is not None:
                    progress()
    return write_report(read_results(path), out_dir)


def report(records: list) -> dict:
    """Per (method, budget): items, turn-1 accuracy, turn-2 accuracy (multi-turn items), agreement share and F1
    with Full (turn 1), the first-parting token's mean, visual tokens and seconds per item."""
    groups = defaultdict(list)
    for r in records:
        if r["turns"]:
            groups[(r["method"], r["budget"])].append(r)
    rows = []
    for (method, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1] or 0)):
        first = [r["turns"][0] for r in rs]
        second = [r["turns"][1] for r in rs if len(r["turns"]) > 1]
        rows.append({"method": method, "budget": budget, "items": len(rs),
                     "accuracy": mean([t["score"] for t in first]),
                     "turn2_accuracy": mean([t["score"] for t in second]),
                     "agreement": mean([t["share"] for t in first if t["share"] is not None]),
                     "f1": mean([t["f1"] for t in first]),
                     "same_answer": mean([float(t["parting"] is None) for t in first]),
                     "visual_tokens": mean([t["visual_tokens"] for t in first]),
                     "seconds_per_item": mean([r["seconds"] for r in rs])})
    return {"rows": rows, "records": len(records)}


def cell(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_report(records: list, out_dir: Path) -> dict:
    rep = report(records)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    head = ("| method | budget | items | accuracy | turn-2 accuracy | agreement with Full | F1 vs Full | "
            "same answer as Full | visual tokens | s / item |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {registry.label(r['method'])} | {cell(r['budget'])} | {r['items']} | {cell(r['accuracy'])} | "
             f"{cell(r['turn2_accuracy'])} | {cell(r['agreement'])} | {cell(r['f1'])} | {cell(r['same_answer'])} | "
             f"{cell(r['visual_tokens'], 0)} | {cell(r['seconds_per_item'], 2)} |" for r in rep["rows"]]
    (out_dir / "report.md").write_text("# zipchat eval\n\n" + head + "\n" + "\n".join(lines) + "\n")
    save_report_plot(rep, out_dir / "plot.png")
    return rep


def save_report_plot(rep: dict, path: Path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4), dpi=100)
    acc, agree = fig.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in rep["rows"]):
        rows = sorted((r for r in rep["rows"] if r["method"] == method), key=lambda r: r["visual_tokens"] or 0)
        style = dict(marker="*", markersize=12, linestyle="") if method == "full" else dict(marker="o")
        for ax, key in ((acc, "accuracy"), (agree, "agreement")):
            ax.plot([r["visual_tokens"] for r in rows], [r[key] if r[key] is not None else float("nan") for r in rows],
                    label=registry.label(method), **style)
    acc.set(xlabel="visual tokens to the LLM", ylabel="accuracy (turn 1)", xscale="log")
    agree.set(xlabel="visual tokens to the LLM", ylabel="agreement with Full (share)", xscale="log")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a .jsonl or .csv file (dataset.py), or a Hugging Face dataset id")
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--methods", default="visionzip", help="comma-separated method names (Full always runs)")
    p.add_argument("--budgets", default="64", help="visual tokens per crop, comma-separated")
    p.add_argument("--out", default="eval-out", help="results.jsonl (resumable) and the report go here")
    p.add_argument("--limit", type=int, help="the first N items only")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--split", default="test")
    p.add_argument("--field", action="append", default=[], help="ours=theirs: a Hugging Face dataset's field names")
    p.add_argument("--vllm-url", help="answer on a running zipchat vLLM server (compress-once methods)")
    p.add_argument("--device")
    p.add_argument("--dtype")
    args = p.parse_args(argv)
    try:
        from tqdm import tqdm
        from .models import load_vlm
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in registry.names()]
        if unknown:
            raise InputError(f"Unknown method(s) {unknown}. Choose from: {', '.join(registry.names())}.")
        budgets = checked_budgets([int(b) for b in args.budgets.split(",") if b.strip()])
        items = load_items(args.data, args.split, dict(f.split("=", 1) for f in args.field), args.limit)
        vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
        engine = None
        if args.vllm_url:
            from .engines.vllm import VLLMEngine
            from .engines.vllm_client import VLLMServer
            engine = VLLMEngine(VLLMServer(args.vllm_url), vlm)
        total = len(items) * (1 + len([m for m in methods if m != "full"]) * len(budgets))
        with tqdm(total=total, desc="eval", file=sys.stderr) as bar:
            rep = evaluate(vlm, items, methods, budgets, args.out, args.max_new_tokens, engine, bar.update)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text())
    return 0 if rep["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
