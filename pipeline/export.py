"""Compare's and the sweep's results as files: JSON (everything: answers, timings, tokens, agreement, the kept
units per crop, the settings and versions), CSV (one row per method or point) and the sweep's plot (PNG).

The plot (matplotlib, no display): agreement with Full (share) and time to first token against the visual
tokens the LLM received, one line per method, Full as a point; the question and the image in its caption.
"""

import csv
import dataclasses
import json
import platform
from pathlib import Path

from .methods import registry


def versions() -> dict:
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def agreement_fields(a) -> dict:
    names = ("logprob", "share", "parting", "f1", "tokens")
    return {f"agreement_{n}": (getattr(a, n) if a is not None else None) for n in names}


def compare_record(session, results: list) -> dict:
    """Compare's results [(method, answer, TurnStats)] as plain data."""
    from .compare import kept_units
    rows = []
    for method, answer, t in results:
        units = kept_units(session, method, t)
        kept = None if units is None else {str(c): sorted(u for cc, u in units if cc == c)
                                           for c in sorted({c for c, _ in units})}
        rows.append({"method": method, "label": registry.label(method), "answer": answer, "stopped": t.stopped,
                     "visual_tokens": t.visual_tokens, "visual_tokens_full": t.visual_tokens_full,
                     "prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens, "ttft_s": t.ttft_s,
                     "encode_s": t.encode_s, "prefill_s": t.prefill_s, "decode_tok_per_s": t.decode_tok_per_s,
                     "device": t.device, "dtype": t.dtype, "engine": t.engine, **agreement_fields(t.agreement),
                     "kept_units": kept})
    st = session.state
    return {"kind": "compare", "model": st.model, "small": st.small, "question": st.turns[-1].question if st.turns
            else "", "image": st.last_image_key, "settings": dataclasses.asdict(st.settings), "versions": versions(),
            "rows": rows}


def sweep_record(session, sweep) -> dict:
    """A Sweep as plain data."""
    rows = [{"method": p.method, "label": registry.label(p.method), "budget": p.budget,
             "visual_tokens": p.visual_tokens, "visual_tokens_full": p.full_tokens, "ttft_s": p.ttft_s,
             "answer": p.answer, "note": p.note, **agreement_fields(p.agreement)} for p in sweep.points]
    st = session.state
    return {"kind": "sweep", "model": st.model, "question": sweep.question, "image": sweep.image,
            "methods": sweep.methods, "budgets": sweep.budgets, "tower_passes": sweep.tower_passes,
            "settings": dataclasses.asdict(st.settings), "versions": versions(), "rows": rows}


def write_files(record: dict, directory, stem: str) -> list:
    """`record` as `stem`.json and `stem`.csv (its rows; nested values as JSON text) in `directory` -> paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    json_path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    rows = record["rows"]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return [str(json_path), str(csv_path)]


def sweep_figure(sweep):
    """The sweep's figure (matplotlib, Agg): agreement and time to first token against visual tokens."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4), dpi=100)
    agree, speed = fig.subplots(1, 2)
    for method in sweep.methods:
        points = sorted((p for p in sweep.points if p.method == method and not p.note), key=lambda p: p.visual_tokens)
        x = [p.visual_tokens for p in points]
        agree.plot(x, [p.agreement.share if p.agreement and p.agreement.share is not None else float("nan")
                       for p in points], marker="o", label=registry.label(method))
        speed.plot(x, [p.ttft_s * 1000 for p in points], marker="o", label=registry.label(method))
    for p in sweep.points:
        if p.method == "full" and not p.note:
            agree.plot([p.visual_tokens], [1.0], marker="*", markersize=12, color="black", linestyle="", label="Full")
            speed.plot([p.visual_tokens], [p.ttft_s * 1000], marker="*", markersize=12, color="black", linestyle="",
                       label="Full")
    ticks = sorted({p.visual_tokens for p in sweep.points if not p.note and p.visual_tokens > 0})
    for ax, label in ((agree, "agreement with Full (share)"), (speed, "time to first token (ms)")):
        ax.set(xlabel="visual tokens to the LLM", ylabel=label, xscale="log")
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)  # the tokens swept, not log decades
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    agree.legend(fontsize=8)
    question = sweep.question if len(sweep.question) <= 80 else sweep.question[:77] + "..."
    fig.suptitle(f"{question}  (image {sweep.image or '-'})", fontsize=9)
    fig.tight_layout()
    return fig


def save_plot(sweep, path) -> str:
    sweep_figure(sweep).savefig(path)
    return str(path)
