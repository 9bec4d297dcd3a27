"""`python -m pipeline.bench`'s command: the rows asked for (or the device's defaults), measured in their
registry's order, then one table (markdown) and the numbers (JSON) written under --out."""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..models import default_device_dtype
from . import rows_cpu, rows_in_llm, rows_prefill, rows_video, rows_vision, serving  # noqa: F401 (they register their rows)
from .core import ROWS, Bench, Clock, markdown, measure_hardware

LETTERS = "abcdefgh"


def arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench",
                                     description="the one place where speed is measured (docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true", help="half-size shapes, 3 repeats (< 3 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny models instead of the presets (tests the code only)")
    parser.add_argument("--rows", default=None, help="comma-separated row ids (default: every row of the device, every "
                                                     "row with --smoke; 25-27, vLLM's, only when asked)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent.parent / "docs" / "benchmarks"))
    return parser.parse_args(argv)


def default_rows(device_type: str) -> set:
    """The rows a device measures unless asked ("both": --smoke's, every row but vLLM's)."""
    return {i for g in ROWS if g.where != "none" and (device_type == "both" or g.where in ("both", device_type))
            for i in g.ids}


def asked(group, wanted: set) -> bool:
    """Whether any row of `group` is wanted ("21" stands for 21a..21e; "21b" for that one)."""
    return any(w == i or (w.startswith(i) and w[len(i):].isalpha()) for i in group.ids for w in wanted)


def main(argv=None):
    args = arguments(argv)
    args.device, args.dtype = default_device_dtype(args.device, args.dtype)
    args.repeats = args.repeats or (3 if args.quick else 5)
    cuda = args.device.type == "cuda"
    wanted = set(args.rows.split(",")) if args.rows else default_rows("both" if args.smoke else args.device.type)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hw = measure_hardware(args.device, args.dtype) if cuda else None
    bench, started, rows = Bench(args, Clock(args.device), hw), time.perf_counter(), []
    for group in sorted(ROWS, key=lambda g: int(g.ids[0])):  # in the order of their ids
        if not asked(group, wanted):
            continue
        measured = group.run(bench)
        for r in measured if isinstance(measured, list) else [measured]:
            if r.id in wanted or r.id.rstrip(LETTERS) in wanted:  # each row printed as soon as it is measured
                rows.append(r)
                print(f"row {r.id}: {r.what}: {r.ratio:.3f}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (int("".join(ch for ch in r.id if ch.isdigit())), r.id))
    write(args, rows, hw, time.perf_counter() - started, argv)


def write(args, rows: list, hw, seconds: float, argv):
    import transformers
    cuda = args.device.type == "cuda"
    meta = {
        "device": args.device.type,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "dtype": str(args.dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "quick": args.quick, "smoke": args.smoke, "repeats": args.repeats,
        "command": "python -m pipeline.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hw, "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d"),
    }
    table = markdown(rows, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device.type}{'-smoke' if args.smoke else '-quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": [dict(asdict(r), ratio=r.ratio, met=r.met) for r in rows]}, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\n({meta['seconds']} s; written to {out / stem}.json and .md)")
