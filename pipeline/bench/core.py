"""What every benchmark row shares: the Row it reports, the clock, side-by-side timing, the hardware floors,
the models it loads, and the row registry (`@row(ids..., title=...)`: a row is declared where it is
defined, and selected by its id)."""

import statistics
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..generate import embed, forward, new_cache
from ..models import load_vlm
from ..state import Turn

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
QUESTION = "Describe this image in detail."
SMOKE_MODELS = {"llava-1.5-7b-arch": "tiny-llava", "llava-ov-0.5b-arch": "tiny-ov-small",
                "llava-ov-7b-arch": "tiny-ov-large", "llava-next-7b-arch": "tiny-next",
                "internvl3-1b-arch": "tiny-internvl-small", "internvl3-8b-arch": "tiny-internvl-large",
                "qwen2.5-vl-3b-arch": "tiny-qwen-small", "qwen2.5-vl-7b-arch": "tiny-qwen-large"}


@dataclass
class RowGroup:
    """Rows measured together by one function (`run(bench) -> Row or [Row]`)."""
    ids: tuple  # the ids it reports; an id stands for its lettered rows too ("21": 21a..21e)
    run: Callable
    title: str
    where: str = "both"  # run by default on "cpu", "cuda", "both", or "none" (only when asked: vLLM's)


ROWS: list = []  # every RowGroup, in the order the rows are measured


def row(*ids, title: str, where: str = "both"):
    """Declare a function as the measurement of rows `ids` (a decorator)."""
    def register(fn):
        ROWS.append(RowGroup(tuple(ids), fn, title, where))
        return fn
    return register


class Bench:
    """What a row gets: the command's arguments, the clock, the hardware floors (GPU), and the model the rows
    share (the last one asked for is kept: rows 3, 4 and 6 measure the same OneVision)."""

    def __init__(self, args, clock, hw):
        self.args, self.clock, self.hw = args, clock, hw
        self._model = (None, None)

    def model(self, name: str):
        if self._model[0] != name:
            self._model = (None, None)  # (the previous one is freed first)
            self._model = (name, arch(name, self.args))
        return self._model[1]


@dataclass
class Row:
    id: str
    what: str
    a: str  # label of side A (the method)
    b: str  # label of side B (the baseline)
    a_s: list = field(default_factory=list)  # timings (s) or values of A
    b_s: list = field(default_factory=list)
    unit: str = "s"
    target: str = ""  # e.g. "<= 0.55"
    floor_a_s: float | None = None
    floor_b_s: float | None = None
    notes: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.a_s) / statistics.median(self.b_s)

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, value = self.target.split()
        return self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)


class Clock:
    """Seconds of a callable: perf_counter on CPU, CUDA events (after a synchronise) on a GPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def side_by_side(clock, a, b, repeats: int, warmup: int = 1):
    """Alternate A and B (A B, B A, A B, ...) after warm-up; -> (times of A, times of B)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ta.append(clock(a))
            tb.append(clock(b))
        else:
            tb.append(clock(b))
            ta.append(clock(a))
    return ta, tb


def measure_hardware(device, dtype) -> dict:
    clock = Clock(device)
    n = 8192 if torch.device(device).type == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    clock(lambda: x @ x)
    t = min(clock(lambda: x @ x) for _ in range(5))
    flops = 2 * n ** 3 / t
    buf = torch.empty(256 * 2 ** 20 if torch.device(device).type == "cuda" else 32 * 2 ** 20, dtype=torch.uint8,
                      device=device)
    dst = torch.empty_like(buf)
    clock(lambda: dst.copy_(buf))
    t = min(clock(lambda: dst.copy_(buf)) for _ in range(5))
    return {"matmul_flops_per_s": flops, "copy_bytes_per_s": 2 * buf.numel() / t}  # read + write


def llm_prefill_cost(vlm, tokens: int, context: int = 0) -> tuple:
    """(FLOPs, bytes) of a prefill of `tokens` on top of `context`: weights read once, 2 FLOPs per
    weight per token, attention 4 * T * (T/2 + context) * hidden per layer, KV written."""
    cfg = vlm.language_model.config
    weights = sum(p.numel() for n, p in vlm.language_model.named_parameters() if "embed_tokens" not in n)
    head = vlm.model.lm_head.weight.numel()  # the last position only
    attn = 4 * tokens * (tokens / 2 + context) * cfg.hidden_size * cfg.num_hidden_layers
    flops = 2 * weights * tokens + 2 * head + attn
    size = torch.finfo(vlm.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return flops, (weights + head + kv * (tokens + context)) * size


def floor_s(cost, hw) -> float | None:
    if not hw:
        return None
    flops, nbytes = cost
    return max(flops / hw["matmul_flops_per_s"], nbytes / hw["copy_bytes_per_s"])


def arch(name: str, args, quick: bool = False):
    """The architecture preset (`quick`: half width and depth), or with --smoke the tiny model of the
    same layout (a seconds-long run of every row's code, for CI; its numbers mean nothing)."""
    if args.smoke:
        return load_vlm(SMOKE_MODELS[name], device=args.device, dtype=args.dtype)
    return load_vlm(name, device=args.device, dtype=args.dtype, quick=args.quick or quick)


def ov_image(tiles: int) -> Image.Image:
    """A photo resized so OneVision picks a 1x1 (384 px) or 2x2 (768 px) tile grid."""
    side = 384 * int(math.sqrt(tiles))
    return Image.open(ASSETS / "coffee.png").convert("RGB").resize((side, side))


def prefill_timer(vlm, ids, feats, positions=None):
    """A callable running one LLM prefill of `ids` (image features in place; `positions`: the family's, default
    0..n-1) on a fresh cache."""
    return lambda: forward(vlm, embed(vlm, ids, feats), new_cache(vlm), positions)


def prefill_inputs(session, image):
    """(ids, image features) of the first question about `image`, as the session would send them."""
    session.add_image(image)
    plan = session.plan(Turn(QUESTION, list(session.state.pending)))
    return plan.ids, [u.features for u in plan.slots if u.features is not None]


def qwen_preset(args) -> tuple:
    """(preset, quick): Qwen2.5-VL-7B's shapes on a GPU; on a CPU the 3B's at half width and depth."""
    return ("qwen2.5-vl-7b-arch", False) if args.device.type == "cuda" else ("qwen2.5-vl-3b-arch", True)


def fmt(v, unit):
    if unit == "bytes":
        return f"{v / 2 ** 20:.1f} MiB"
    if unit == "share":
        return f"{v:.3f}"
    return f"{v * 1000:.1f} ms" if v < 10 else f"{v:.1f} s"


def spread(values, unit) -> str:
    return f"{fmt(statistics.median(values), unit)} ({fmt(min(values), unit)}..{fmt(max(values), unit)})"


def markdown(rows, meta) -> str:
    lines = [f"Device: {meta['device_name']} · {meta['dtype']} · torch {meta['torch']} · transformers "
             f"{meta['transformers']} · {'smoke (tiny models)' if meta['smoke'] else 'quick' if meta['quick'] else 'full'} shapes"
             f" · {meta['repeats']} repeats",
             f"Command: `{meta['command']}`", "",
             "| row | what | A | B | A median (min..max) | B median (min..max) | A/B | target | met |"
             + (" floor A / B |" if meta.get("hardware") else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if meta.get("hardware") else "")]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        line = (f"| {r.id} | {r.what} | {r.a} | {r.b} | {spread(r.a_s, r.unit)} | {spread(r.b_s, r.unit)} | "
                f"{r.ratio:.3f} | {r.target} | {met} |")
        if meta.get("hardware"):
            fa = fmt(r.floor_a_s, "s") if r.floor_a_s else "-"
            fb = fmt(r.floor_b_s, "s") if r.floor_b_s else "-"
            line += f" {fa} / {fb} |"
        lines.append(line)
    notes = [f"- row {r.id}: {r.notes}" for r in rows if r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def turn_two_timer(session, question: str):
    """A callable asking `question` as turn 2 of `session` (turn 1 asked, its answer 1 token long from now on):
    each call goes back to the end of turn 1, its conversation and a KV cache that holds just that (with
    reuse_cache, turn 2 prefills its new tokens on that cache; without, everything)."""
    turns = list(session.state.turns)
    cache, signature = session.kv.checkout(session.state.session_id, "large")
    session.kv.checkin(session.state.session_id, "large", cache, signature)
    signature = list(signature)
    session.set_method(session.settings.method, max_new_tokens=1)

    def run():
        session.state.turns = list(turns)
        cache, _ = session.kv.checkout(session.state.session_id, "large")
        session.kv.checkin(session.state.session_id, "large", cache, list(signature))
        session.ask(question)
    return run
