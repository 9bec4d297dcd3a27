"""`python -m pipeline.bench`: the one place where speed is measured.

Every comparison runs both sides in one process, alternating (A B, B A, ...), after a warm-up, and
reports the median and spread (min..max) of the repeats and the ratio of medians. CUDA timings use
events after a synchronise. Models are the architecture presets: real shapes, random weights.
On a GPU each row also gets a floor: max(FLOPs / measured matmul rate, bytes / measured copy
bandwidth), both measured at start.

    python -m pipeline.bench            # CPU rows 1-6, 10-24 (about an hour on 2 cores)
    python -m pipeline.bench --quick    # half-width/half-depth shapes, fewer repeats (< 3 minutes)
    python -m pipeline.bench --device cuda   # rows 1-14, 18-24 on a GPU (bf16)
    python -m pipeline.bench --rows 25,26,27 # vLLM serving, in the vLLM environment (bench_serving.py)
"""

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .chat import Message
from .compress import encode_image
from .generate import embed, forward, new_cache
from .heatmap import render_map
from .kvstore import cache_nbytes
from .models import cpu_native_bf16, default_device_dtype, load_vlm
from .session import ChatSession
from .state import Turn
from .families.llava_common import attention_statistics, run_tower
from .methods.visionzip import select

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUESTION = "Describe this image in detail."


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


# ---- hardware floors (GPU) ------------------------------------------------------------------------
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


SMOKE_MODELS = {"llava-1.5-7b-arch": "tiny-llava", "llava-ov-0.5b-arch": "tiny-ov-small",
                "llava-ov-7b-arch": "tiny-ov-large", "llava-next-7b-arch": "tiny-next",
                "internvl3-1b-arch": "tiny-internvl-small", "internvl3-8b-arch": "tiny-internvl-large",
                "qwen2.5-vl-3b-arch": "tiny-qwen-small", "qwen2.5-vl-7b-arch": "tiny-qwen-large"}


def arch(name: str, args, quick: bool = False):
    """The architecture preset (`quick`: half width and depth), or with --smoke the tiny model of the
    same layout (a seconds-long run of every row's code, for CI; its numbers mean nothing)."""
    if args.smoke:
        return load_vlm(SMOKE_MODELS[name], device=args.device, dtype=args.dtype)
    return load_vlm(name, device=args.device, dtype=args.dtype, quick=args.quick or quick)


# ---- rows -----------------------------------------------------------------------------------------
def row_encode(args, clock, hw) -> list:
    """1-2: CLIP-L/336 tower up to layer -2 + VisionZip vs the reference-style encode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .arch import shrink
    from .families.llava import CLIP_L_336
    shape = shrink(CLIP_L_336) if args.quick else CLIP_L_336
    if args.smoke:
        shape = dict(CLIP_L_336, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    with torch.device(args.device):
        tower = CLIPVisionModel(CLIPVisionConfig(**shape, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(default)
    reference = copy.deepcopy(tower)
    reference.set_attn_implementation("eager")
    from transformers import CLIPImageProcessorPil
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=[Image.open(ASSETS / "chelsea.png").convert("RGB")], return_tensors="pt")["pixel_values"]
    pixels = pixels.to(args.device, args.dtype)
    run = shape["num_hidden_layers"] - 1  # feature layer -2
    layer = tower.encoder.layers[run - 1] if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[run - 1]

    @torch.inference_mode()
    def ours():
        out = run_tower(tower, pixels, run, has_cls=True, with_stats=True)
        return select(out.units[0], out.scores[0], out.keys[0], 54, 10, True)

    @torch.inference_mode()
    def original_style():
        # as the original VisionZip: every layer eager with its attention materialised, all layers run
        out = reference(pixels, output_attentions=True, output_hidden_states=True)
        scores = out.attentions[run - 1][0, :, 0, :].sum(0)
        ref_layer = getattr(reference, "vision_model", reference).encoder.layers[run - 1]
        x = ref_layer.layer_norm1(out.hidden_states[run - 1])
        keys = ref_layer.self_attn.k_proj(x).view(1, x.shape[1], -1, ref_layer.self_attn.head_dim).mean(2)
        return select(out.hidden_states[run][0], scores, keys[0], 54, 10, True)

    ta, tb = side_by_side(clock, ours, original_style, args.repeats)
    h = (pixels.shape[-1] // shape["patch_size"]) ** 2 + 1
    per_layer = 2 * h * (4 * shape["hidden_size"] ** 2 + 2 * shape["hidden_size"] * shape["intermediate_size"]) \
        + 4 * h * h * shape["hidden_size"]
    weights = sum(p.numel() for p in tower.parameters()) * (torch.finfo(args.dtype).bits // 8)
    rows = [Row("1", "vision encode + VisionZip selection, CLIP-L/336", "ours: SDPA, layers to -2, 1 attention row",
                "original-style: eager, all layers, attentions materialised", ta, tb, target="<= 0.55",
                floor_a_s=floor_s((per_layer * run, weights), hw),
                floor_b_s=floor_s((per_layer * shape["num_hidden_layers"], weights), hw))]

    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.__setitem__("x", a[0] if a else k["hidden_states"]),
                                           with_kwargs=True)
    ours()
    hook.remove()
    feats = run_tower(tower, pixels, run, has_cls=True, with_stats=False).units[0]

    @torch.inference_mode()
    def selection_only():
        scores, keys = attention_statistics(layer, captured["x"], True)
        return select(feats, scores[0], keys[0], 54, 10, True)

    ts, te = side_by_side(clock, selection_only, ours, args.repeats)
    rows.append(Row("2", "selection alone (scores + merge) / whole encode", "scores + merge", "encode + selection",
                    ts, te, target="<= 0.03"))
    return rows


def ov_image(tiles: int) -> Image.Image:
    """A photo resized so OneVision picks a 1x1 (384 px) or 2x2 (768 px) tile grid."""
    side = 384 * int(math.sqrt(tiles))
    return Image.open(ASSETS / "coffee.png").convert("RGB").resize((side, side))


def prefill_timer(vlm, ids, feats):
    """A callable running one LLM prefill of `ids` (image features in place) on a fresh cache."""
    return lambda: forward(vlm, embed(vlm, ids, feats), new_cache(vlm))


def prefill_inputs(session, image):
    """(ids, image features) of the first question about `image`, as the session would send them."""
    session.add_image(image)
    plan = session.plan(Turn(QUESTION, list(session.state.pending)))
    return plan.ids, [u.features for u in plan.slots if u.features is not None]


def row_prefill(args, clock, hw, vlm) -> list:
    """3: LLM prefill VisionZip-64 vs full on llava-ov-0.5b-arch (one 384 image; 2x2 tiles)."""
    rows = []
    for tiles, target in ((1, "<= 0.2"), (4, "<= 0.1")):
        image = ov_image(tiles)
        sides = {}
        for method in ("visionzip", "full"):
            s = ChatSession(vlm, method=method, max_new_tokens=1)
            ids, feats = prefill_inputs(s, image)
            sides[method] = (s, ids, feats, s.current_view()[1])

        ta, tb = side_by_side(clock, prefill_timer(vlm, *sides["visionzip"][1:3]),
                              prefill_timer(vlm, *sides["full"][1:3]), args.repeats)
        # time to first token with the image already compressed (fresh session, shared compress cache)
        ttft = {}
        for method in ("visionzip", "full"):
            s = ChatSession(vlm, method=method, max_new_tokens=1)
            s.state.compressions = sides[method][0].state.compressions
            s.add_image(image)
            s.ask(QUESTION)
            ttft[method] = s.last_turn.ttft_s
        za, zb = sides["visionzip"][3], sides["full"][3]
        rows.append(Row(
            "3" + ("" if tiles == 1 else "b"),
            f"LLM prefill, {vlm.name}, {image.width}px image ({len(za.crops)} crops: {za.num_tokens} vs {zb.num_tokens} "
            f"visual tokens, {len(sides['full'][1])} in the prompt)", "VisionZip 54+10 per crop", "full",
            ta, tb, target=target,
            floor_a_s=floor_s(llm_prefill_cost(vlm, len(sides["visionzip"][1])), hw),
            floor_b_s=floor_s(llm_prefill_cost(vlm, len(sides["full"][1])), hw),
            notes=f"TTFT (image cached): {ttft['visionzip'] * 1000:.0f} ms vs {ttft['full'] * 1000:.0f} ms; "
                  f"encode+compress: {za.encode_s * 1000:.0f} ms vs {zb.encode_s * 1000:.0f} ms"))
    return rows


def row_turn2(args, clock, hw, vlm) -> Row:
    """4: turn-2 TTFT with KV reuse vs recomputing the whole conversation (full tokens)."""
    image = ov_image(1)
    sessions = {}
    for reuse in (True, False):
        s = ChatSession(vlm, method="full", max_new_tokens=8, reuse_cache=reuse)
        if sessions:
            s.state.compressions = next(iter(sessions.values()))[0].state.compressions
        s.add_image(image)
        s.ask(QUESTION)
        cache, signature = s.kv.checkout(s.state.session_id, "large")
        s.kv.checkin(s.state.session_id, "large", cache, signature)
        sessions[reuse] = (s, list(s.state.turns), signature)
        s.set_method("full", max_new_tokens=1)

    def second_turn(reuse):
        s, turns, signature = sessions[reuse]

        def run():  # back to the end of turn 1: its conversation, and a cache that holds just that
            s.state.turns = list(turns)
            cache, _ = s.kv.checkout(s.state.session_id, "large")
            s.kv.checkin(s.state.session_id, "large", cache, list(signature))
            s.ask("And what colours dominate?")
        return run

    ta, tb = side_by_side(clock, second_turn(True), second_turn(False), args.repeats)
    s = sessions[True][0]
    return Row("4", f"turn-2 time to first token, {vlm.name}, full tokens ({s.last_turn.prompt_tokens} in context)",
               f"KV reuse ({s.last_turn.prefill_tokens} new tokens)", "recompute the conversation", ta, tb,
               target="<= 0.1", floor_a_s=floor_s(llm_prefill_cost(vlm, s.last_turn.prefill_tokens,
                                                                     s.last_turn.prompt_tokens), hw),
               floor_b_s=floor_s(llm_prefill_cost(vlm, s.last_turn.prompt_tokens), hw))


def row_kv_bytes(args) -> Row:
    """5: KV-cache bytes after turn 1, llava-1.5-7b-arch shapes, read off the cache itself (run on
    the meta device: real shapes and dtypes, no memory and no arithmetic)."""
    vlm = load_vlm("llava-1.5-7b-arch", device="meta", dtype=torch.float16, quick=False)
    (_, before), _, (_, after) = vlm.chat.render([Message("user", QUESTION, ["image"])])
    sizes = {}
    for n in (64, 576):
        ids = before + [vlm.image_token_id] * n + after
        cache = new_cache(vlm)
        forward(vlm, embed(vlm, ids, [torch.empty(n, vlm.language_model.config.hidden_size, device="meta")]), cache)
        sizes[n] = cache_nbytes(cache)
    return Row("5", "KV-cache bytes after the prompt, llava-1.5-7b-arch (fp16, 32 layers x 4096)",
               "VisionZip-64", "full (576)", [sizes[64]], [sizes[576]], unit="bytes", target="<= 0.2",
               notes=f"{sizes[64] / 2 ** 20:.0f} MiB vs {sizes[576] / 2 ** 20:.0f} MiB, {len(before) + len(after)} text tokens")


def row_heatmap(args, clock, vlm) -> Row:
    """6: rendering the selection map + score map (median of repeats), 5-crop anyres image."""
    image = ov_image(4)
    comp = encode_image(vlm, image, "visionzip")
    times = [clock(lambda: (render_map(image, comp, "kept"), render_map(image, comp, "scores"))) for _ in range(10)]
    budget = [0.150] * len(times)
    return Row("6", f"maps (kept + scores views) for {len(comp.crops)} crops", "render", "150 ms budget",
               times, budget, target="<= 1.0")


def row_large_prefill(args, clock, hw, row_id, preset, image, what, labels, target, quick=False) -> Row:
    """7, 8, 10, 11: LLM prefill of a preset, VisionZip-64 per crop vs all visual tokens."""
    vlm = arch(preset, args, quick)
    sides = {m: prefill_inputs(ChatSession(vlm, method=m), image) for m in ("visionzip", "full")}
    ta, tb = side_by_side(clock, prefill_timer(vlm, *sides["visionzip"]), prefill_timer(vlm, *sides["full"]),
                          args.repeats)
    n_zip, n_full = len(sides["visionzip"][0]), len(sides["full"][0])
    return Row(row_id, f"LLM prefill, {vlm.name}, {what} ({n_zip} vs {n_full} tokens)", *labels, ta, tb,
               target=target, floor_a_s=floor_s(llm_prefill_cost(vlm, n_zip), hw),
               floor_b_s=floor_s(llm_prefill_cost(vlm, n_full), hw))


def row_llava_7b_prefill(args, clock, hw) -> Row:
    """7: llava-1.5-7b-arch, 576 -> 64 visual tokens."""
    image = Image.open(ASSETS / "chelsea.png").convert("RGB")
    return row_large_prefill(args, clock, hw, "7", "llava-1.5-7b-arch", image, "one 336 px crop",
                             ("VisionZip-64", "full (576)"), "<= 0.5")


def row_ov_7b_anyres(args, clock, hw) -> Row:
    """8: llava-ov-7b-arch, a 3x3-tile image (the most tokens full OneVision sends), 64 per crop."""
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1152, 1152))
    return row_large_prefill(args, clock, hw, "8", "llava-ov-7b-arch", image, "1152 px image (1 + 3x3 crops)",
                             ("VisionZip 64/crop", "full anyres"), "<= 0.15")


def row_next_anyres(args, clock, hw) -> Row:
    """10: llava-next-7b-arch at its largest anyres grid (base + 2x2 tiles of 336 px), 64 per crop.
    On a CPU the half-width, half-depth shapes (a 7B model does not fit in float32 here)."""
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((672, 672))
    return row_large_prefill(args, clock, hw, "10", "llava-next-7b-arch", image, "672 px image (1 + 2x2 crops)",
                             ("VisionZip 64/crop", "full anyres"), "<= 0.15", quick=args.device.type == "cpu")


def row_internvl(args, clock, hw) -> Row:
    """11: InternVL3 at 1 + 6 tiles (a 3:2 image: 3x2 tiles of 448 px + thumbnail), 64 vs 256 units per
    tile: internvl3-8b-arch on a GPU, internvl3-1b-arch (real shapes) on a CPU."""
    image = Image.open(ASSETS / "coffee.png").convert("RGB").resize((1344, 896))
    preset = "internvl3-8b-arch" if args.device.type == "cuda" else "internvl3-1b-arch"
    return row_large_prefill(args, clock, hw, "11", preset, image, "1344x896 image (3x2 tiles + thumbnail)",
                             ("VisionZip 64/tile", "full (256/tile)"), "<= 0.3")


def qwen_preset(args) -> tuple:
    """(preset, quick): Qwen2.5-VL-7B's shapes on a GPU; on a CPU the 3B's at half width and depth."""
    return ("qwen2.5-vl-7b-arch", False) if args.device.type == "cuda" else ("qwen2.5-vl-3b-arch", True)


def row_qwen_prefill(args, clock, hw) -> Row:
    """12: Qwen2.5-VL at 1024x768 (about 1000 image tokens), VisionZip's 64/576 share (11%) vs full."""
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1024, 768))
    preset, quick = qwen_preset(args)
    return row_large_prefill(args, clock, hw, "12", preset, image, "1024x768 image", ("VisionZip 11%", "full"),
                             "<= 0.2", quick=quick)


def row_qwen_encode(args, clock) -> Row:
    """13: Qwen2.5-VL's vision encode with the score capture (hooks on the last block, its attention
    statistic by hand) vs the plain tower, both on a 1024x768 image."""
    preset, quick = qwen_preset(args)
    vlm = arch(preset, args, quick)
    prepared = vlm.family.prepare(Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1024, 768)))
    visual = vlm.family.tower(vlm.model)
    pixels = prepared.pixel_values.to(visual.device, visual.dtype)
    grid = prepared.extra["grid_thw"].to(visual.device)
    with torch.inference_mode():
        ta, tb = side_by_side(clock, lambda: vlm.family.encode(vlm.model, prepared, with_stats=True),
                              lambda: visual(pixels, grid_thw=grid), args.repeats)
    return Row("13", f"vision encode, {vlm.name} tower, 1024x768 ({prepared.pixel_values.shape[0]} patches)",
               "with VisionZip's score capture", "plain tower", ta, tb, target="<= 1.05")


def answer_ids(vlm, image, n: int) -> list:
    s = ChatSession(vlm, method="visionzip", max_new_tokens=n, stop_at_eos=False)
    s.add_image(image)
    s.ask(QUESTION)
    return [k[1] for k in s.kv.signature(s.state.session_id, "large")[-(n - 1):]]  # the answer fed back


def row_bf16_quality(args) -> Row:
    """14: bf16 vs float32, on the tiny models (every CPU; the architecture presets where bf16 is native or
    on a GPU): share of dominant tokens both select on the four example images, and how many greedy
    answer tokens agree (random weights have no margin between tokens: a lower bound)."""
    names = ["tiny-llava", "tiny-ov-small"]
    if args.device.type == "cuda" or cpu_native_bf16():
        names.append("llava-ov-0.5b-arch")
    overlaps, agree = {}, {}
    for name in names:
        a, b = (load_vlm(name, device=args.device, dtype=d, quick=args.quick) for d in (torch.float32, torch.bfloat16))
        agree[name], overlaps[name] = [], []
        for f in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")[: 1 if args.smoke else 4]:
            image = Image.open(ASSETS / f).convert("RGB")
            for x, y in zip(encode_image(a, image).crops, encode_image(b, image).crops):
                overlaps[name].append(len(set(x.dominant) & set(y.dominant)) / len(x.dominant))
            ids = [answer_ids(v, image, 16) for v in (a, b)]
            agree[name].append(next((i for i, (p, q) in enumerate(zip(*ids)) if p != q), len(ids[0])))
    # The measure: the tiny models (peaked random weights). An architecture preset's random weights at real
    # shapes attend almost uniformly, so there bf16's rounding alone decides the ranking: reported, not measured.
    tiny = [o for name, values in overlaps.items() if name.startswith("tiny-") for o in values]
    return Row("14", "bf16 vs float32: dominant tokens selected by both (share, tiny models)", "overlap", "all",
               [min(tiny)], [1.0], unit="share", target=">= 0.9",
               notes="dominant overlap mean (min) over crops: " + "; ".join(
                   f"{k} {statistics.mean(v):.3f} ({min(v):.3f}, {len(v)} crops)" for k, v in overlaps.items())
               + "; greedy tokens equal before the first difference (of 15): "
               + "; ".join(f"{k} {v}" for k, v in agree.items())
               + ("; the -arch preset has random weights at real shapes (near-uniform attention: bf16 rounding "
                  "decides its ranking), so it is not part of the measure" if len(names) > 2 else ""))


def row_cpu_first_turn(args, clock, hw) -> list:
    """15-17: what a free CPU Space sees with llava-ov-0.5b: first-turn time to first token (image encode
    + compress + prefill) at 384 px in the default dtype vs float32 (15); decode tokens per second
    against the bytes each token reads (16); the first turn on a 1152x1152 photo with the CPU's tile cap
    (base + up to 2x2 tiles) vs all the tiles the checkpoint uses (3x3) (17)."""
    dtype = args.dtype
    vlm = arch("llava-ov-0.5b-arch", args)
    rows = []

    def first_turn(v, image, max_tiles=0, n=1):
        def run():
            s = ChatSession(v, method="visionzip", max_new_tokens=n, stop_at_eos=False, max_tiles=max_tiles)
            s.add_image(image, compress=False)
            s.ask(QUESTION)
            return s
        return run

    image = ov_image(1)
    if dtype != torch.float32:
        f32 = arch("llava-ov-0.5b-arch", argparse.Namespace(**{**vars(args), "dtype": torch.float32}))
        ta, tb = side_by_side(clock, first_turn(vlm, image), first_turn(f32, image), args.repeats)
        rows.append(Row("15", f"first-turn TTFT, {vlm.name}, 384 px, VisionZip-64", str(dtype).replace("torch.", ""),
                        "float32", ta, tb, target="<= 0.45"))
    else:
        reason = "no native bf16 on this CPU (AVX512-BF16/AMX): bf16 would be emulated, the default stays float32"
        t = [clock(first_turn(vlm, image)) for _ in range(args.repeats)]
        rows.append(Row("15", f"first-turn TTFT, {vlm.name}, 384 px, VisionZip-64", "float32", "float32", t, t,
                        notes=reason))
    s = first_turn(vlm, image, n=48)()
    cfg = vlm.language_model.config
    weights = sum(p.numel() for n_, p in vlm.language_model.named_parameters() if "embed_tokens" not in n_)
    per_token = (weights + vlm.model.lm_head.weight.numel()) * torch.finfo(vlm.dtype).bits // 8
    w = torch.randn(8 * 4864, 896, dtype=vlm.dtype, device=args.device)
    x = torch.randn(1, 896, dtype=vlm.dtype, device=args.device)
    gemv = min(clock(lambda: x @ w.T) for _ in range(10))
    bound = w.numel() * w.element_size() / gemv / per_token  # tokens/s if only reading weights
    rows.append(Row("16", f"decode, {vlm.name} ({str(vlm.dtype).replace('torch.', '')}), 48 tokens",
                    "seconds per token", "weight-read bound", [1 / s.last_turn.decode_tok_per_s], [1 / bound],
                    target="<= 1.3", notes=f"{s.last_turn.decode_tok_per_s:.1f} tok/s vs {bound:.1f} tok/s at "
                                           f"{per_token / 1e9:.2f} GB per token ({cfg.num_hidden_layers} layers + "
                                           f"lm_head) and {w.numel() * w.element_size() / gemv / 1e9:.1f} GB/s "
                                           "measured matrix-vector bandwidth"))
    big = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1152, 1152))  # 3x3 tiles uncapped
    crops = {cap: len(vlm.family.layout(big, cap or None).crops) for cap in (4, 0)}
    ta, tb = side_by_side(clock, first_turn(vlm, big, 4), first_turn(vlm, big, 0), args.repeats)
    rows.append(Row("17", f"first-turn TTFT, {vlm.name}, 1152x1152, VisionZip-64", f"tile cap 4 ({crops[4]} crops)",
                    f"all tiles ({crops[0]} crops)", ta, tb, target="<= 0.55",
                    notes=f"the encode scales with the crops: {crops[4]}/{crops[0]} = {crops[4] / crops[0]:.2f}"))
    return rows


def row_context_edge(args, clock) -> Row:
    """18: a long conversation at the context edge: the mean time to first token of 10 turns past the edge
    (what a person waits before each answer starts), dropping the oldest turns down to 3/4 of the window when
    a turn does not fit (the following turns reuse the cache) vs one turn at a time (every turn past the
    edge prefills the whole conversation again); the whole turns' mean in the notes. The two
    conversations advance turn by turn, alternating."""
    vlm = arch("llava-ov-0.5b-arch", args)
    window = 512 if args.smoke else 4096  # LLaVA-1.5's window; turns of ~80 tokens: a drop frees room for ~12
    question = " ".join(["Please tell me one more thing about the colours, the shapes and the light you can see here."]
                        * 2)
    answer_tokens = 16
    sessions = {}
    for fill in (0.75, 1.0):
        s = ChatSession(vlm, method="visionzip", max_new_tokens=answer_tokens, stop_at_eos=False,
                        context_window=window, edge_fill=fill)
        s.add_image(ov_image(1))
        sessions[fill] = s
    per_turn = len(vlm.tokenizer(question)["input_ids"]) + answer_tokens
    while any(not s.last_turn or not s.last_turn.dropped_turns for s in sessions.values()):  # up to the edge
        for s in sessions.values():
            s.ask(question)
    ttft, turn = {fill: [] for fill in sessions}, {fill: [] for fill in sessions}
    for n in range(10):
        for fill in (sorted(sessions) if n % 2 == 0 else sorted(sessions, reverse=True)):
            turn[fill].append(clock(lambda: sessions[fill].ask(question)))
            ttft[fill].append(sessions[fill].last_turn.ttft_s)
    notes = (f"window {window} tokens, {per_turn} tokens per turn ({answer_tokens}-token answers), one 384 px image "
             f"(VisionZip); whole turns: {statistics.mean(turn[0.75]):.2f} s vs {statistics.mean(turn[1.0]):.2f} s "
             f"({statistics.mean(turn[0.75]) / statistics.mean(turn[1.0]):.2f}); turns dropped in all: "
             f"{sessions[0.75].state.window_start} (3/4 rule) and {sessions[1.0].state.window_start} (one at a time)")
    return Row("18", f"time to first token past the context edge, {vlm.name} (mean of 10 turns)",
               "drop to 3/4 of the window", "one turn at a time", [statistics.mean(ttft[0.75])],
               [statistics.mean(ttft[1.0])], target="<= 0.3", notes=notes)


def row_identical_crops(args, clock) -> Row:
    """19: the vision encode of a 384x384 image on OneVision, whose base image and single tile are the
    same pixels: encoded once (identical crops found by comparing the preprocessed tensors) vs each."""
    from .compress import encode_distinct
    vlm = arch("llava-ov-0.5b-arch", args)
    prepared = vlm.family.prepare(ov_image(1))
    with torch.inference_mode():
        ta, tb = side_by_side(clock, lambda: encode_distinct(vlm.family, vlm.model, prepared, True),
                              lambda: vlm.family.encode(vlm.model, prepared, True), args.repeats)
    return Row("19", f"vision encode + VisionZip statistic, {vlm.name}, 384x384 ({len(prepared.crops)} crops, "
               "the same pixels)", "identical crops encoded once", "every crop encoded", ta, tb, target="<= 0.6")


def row_example(args, clock) -> Row:
    """20: the first answer about an example image, compressed ahead (examples.py), vs about a new image of
    the same size (the example mirrored): time to the first token, the image's decode included."""
    import tempfile
    from PIL import ImageOps
    from .examples import ExampleCache
    vlm = arch("llava-ov-0.5b-arch", args)
    example = ASSETS / "chelsea.png"
    examples = ExampleCache()
    examples.warm(vlm, [str(example)], "visionzip", max_tiles=4)
    new = Path(tempfile.mkdtemp()) / "mirrored.png"
    ImageOps.mirror(Image.open(example).convert("RGB")).save(new)

    def first_turn(path):
        def run():
            s = ChatSession(vlm, method="visionzip", max_new_tokens=1, stop_at_eos=False, max_tiles=4,
                            examples=examples)
            s.add_image(path, compress=False)
            s.ask(QUESTION)
        return run
    ta, tb = side_by_side(clock, first_turn(example), first_turn(new), args.repeats)
    return Row("20", f"first answer's time to first token, {vlm.name}, a 451x300 photo, VisionZip-64",
               "an example (compressed ahead)", "a new image of the same size", ta, tb, target="<= 0.3")


def row_sgl(args, clock, hw) -> list:
    """9: SGL llava-ov-0.5b-arch -> llava-ov-7b-arch, keep 9% at 0.4 depth, 32 new tokens per
    question (stop tokens ignored: random weights would stop at random). The image is compressed
    once beforehand, as in a conversation; each repeat is a fresh question."""
    small = arch("llava-ov-0.5b-arch", args)
    large = arch("llava-ov-7b-arch", args)
    image = ov_image(1)
    shared = OrderedDict()  # one compress-once cache for every session below

    def question(vlm, **kw):
        def run():
            s = ChatSession(vlm, max_new_tokens=32, stop_at_eos=False, **kw)
            s.state.compressions = shared
            s.add_image(image)
            s.ask(QUESTION)
        return run

    sgl = dict(method="sgl", small=small, keep_ratio=0.09, prune_layer=0.4)
    ta, tb = side_by_side(clock, question(large, early_exit=None, **sgl), question(large, method="full"), args.repeats)
    rows = [Row("9", "SGL end to end per question, 32 new tokens", "SGL (small answers and ranks, large pruned)",
                "large model alone", ta, tb, target="<= 0.7")]
    # early_exit=0 always exits: the small model's answer with guidance capture plus the exit score
    tg, tp = side_by_side(clock, question(large, early_exit=0.0, **sgl), question(small, method="full"), args.repeats)
    rows.append(Row("9b", "small model: answer with guidance capture (+ exit score) vs plain answer", "with capture",
                    "plain", tg, tp, target="<= 1.15"))
    return rows


def vision_only(name: str, args, quick: bool = False):
    """A preset's vision tower and projector with random weights, its language model left on the meta
    device (a 7B preset's vision side fits anywhere) -> (family, model, image processor)."""
    if args.smoke:
        vlm = load_vlm(SMOKE_MODELS[name], device=args.device, dtype=args.dtype)
        return vlm.family, vlm.model
    from .arch import ARCH_PRESETS, build_arch_model
    model, tokenizer, processor = build_arch_model(name, "meta", args.dtype, quick=args.quick or quick)
    family = ARCH_PRESETS[name][0](model.config, processor, tokenizer)
    for module in (family.tower(model), model.model.multi_modal_projector):
        module.to_empty(device=args.device)
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
                else:
                    p.fill_(1.0) if pname.endswith("weight") else p.zero_()
            for bname, b in module.named_buffers():  # (non-persistent buffers come back uninitialised)
                if bname.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return family, model


def row_selection(args, clock) -> list:
    """21-22: each compress-once method's selection (with the projection it needs) over the vision
    encode it follows, on CLIP-L/336 (LLaVA-1.5-7B: projector to 4096) and SigLIP-so400m (OneVision-0.5B,
    a 384 px image: base + 1 tile). DivPrune and Pool project every unit (DESIGN: on P)."""
    from .methods import registry
    from .methods.base import CropInput
    rows = []
    for row_id, preset, image in (("21", "llava-1.5-7b-arch", Image.open(ASSETS / "chelsea.png").convert("RGB")),
                                  ("22", "llava-ov-0.5b-arch", ov_image(1))):
        family, model = vision_only(preset, args)
        prepared = family.prepare(image)
        with torch.inference_mode():
            out = family.encode(model, prepared, with_stats=True)
        offset = 1 if family.has_cls else 0

        def selection(method):
            @torch.inference_mode()
            def run():
                for i, crop in enumerate(prepared.crops):
                    d, c = family.budget(54, 10, out.units.shape[1] - offset)
                    picked = registry.get(method).pick(CropInput(
                        units=out.units[i], scores=out.scores[i], keys=out.keys[i], has_cls=family.has_cls,
                        grid=crop.grid, dominant=d, contextual=c, seed=i,
                        project=lambda u: family.project(model, u[None])[0], project_parts=family.project_parts(model)))
                    if not picked.projected:
                        family.project(model, picked.tokens[None])
            return run

        encode = torch.inference_mode()(lambda: family.encode(model, prepared, with_stats=True))
        targets = {"divprune": "<= 0.08"}
        for k, method in enumerate(registry.of_kind(registry.COMPRESS_ONCE)):
            ta, tb = side_by_side(clock, selection(method), encode, args.repeats)
            rows.append(Row(f"{row_id}{chr(ord('a') + k)}", f"{method} selection / vision encode, {preset} "
                            f"({len(prepared.crops)} crop{'s' * (len(prepared.crops) > 1)})", f"{method} selection",
                            "encode to the feature layer (+ scores)", ta, tb, target=targets.get(method, "<= 0.03")))
    return rows


def row_equal_budget_prefill(args, clock, hw, vlm) -> list:
    """23: LLM prefill at VisionZip's budget for the other compress-once methods vs full (as row 3):
    the same number of visual tokens, so the same saving."""
    image = ov_image(1)
    full = prefill_inputs(ChatSession(vlm, method="full", max_new_tokens=1), image)
    rows = []
    for k, method in enumerate(("divprune", "vispruner", "random", "pool")):
        ids, feats = prefill_inputs(ChatSession(vlm, method=method, max_new_tokens=1), image)
        ta, tb = side_by_side(clock, prefill_timer(vlm, ids, feats), prefill_timer(vlm, *full), args.repeats)
        rows.append(Row(f"23{'abcd'[k]}", f"LLM prefill, {vlm.name}, {image.width}px image, {method} at 54+10 per "
                        f"crop ({sum(len(f) for f in feats)} vs {sum(len(f) for f in full[1])} visual tokens)",
                        method, "full", ta, tb, target="<= 0.2",
                        floor_a_s=floor_s(llm_prefill_cost(vlm, len(ids)), hw),
                        floor_b_s=floor_s(llm_prefill_cost(vlm, len(full[0])), hw)))
    return rows


def row_in_llm_first_turn(args, clock, hw) -> list:
    """24: FastV (K = 2, keep 50%) and SGL (small ranks, large keeps 35% from 0.4 depth, no early exit)
    first turn vs Full on the OneVision pair: a new image and question, 32 new tokens (stop tokens
    ignored), VisionZip-free (all 1,836 tokens of a 2x2-tile image reach the model's first layers).
    On a CPU the 7B at --quick shapes (full ones do not fit in 24 GB)."""
    cpu = args.device.type != "cuda"
    large = arch("llava-ov-7b-arch", args, quick=cpu)
    small = arch("llava-ov-0.5b-arch", args)
    image = ov_image(4)

    def first_turn(vlm, **kw):
        def run():
            s = ChatSession(vlm, max_new_tokens=32, stop_at_eos=False, **kw)
            s.add_image(image)
            s.ask(QUESTION)
            return s.last_turn
        return run
    full = first_turn(large, method="full")
    ta, tb = side_by_side(clock, first_turn(large, method="fastv"), full, args.repeats)
    t = first_turn(large, method="fastv")()
    rows = [Row("24", f"first turn, {large.name}{' (quick shapes)' if cpu and not args.smoke else ''}, 768 px image, "
                f"32 new tokens", "FastV K=2, keep 50%", "full", ta, tb, target="<= 0.9",
                notes=f"FastV keeps {len(t.guidance.kept)} of {t.visual_tokens} visual tokens from layer 2")]
    ta, tb = side_by_side(clock, first_turn(large, method="sgl", small=small, early_exit=None), full, args.repeats)
    rows.append(Row("24b", "first turn, the same: SGL (0.5b ranks, large keeps 35% from 0.4 depth) vs full",
                    "SGL, no early exit", "full", ta, tb, target="<= 0.9"))
    return rows


# ---- main -----------------------------------------------------------------------------------------
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half-size shapes, 3 repeats (< 3 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny models instead of the presets (tests the code only)")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: 1-6 and 10-24 on CPU, 1-14 and 18-24 on CUDA)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks"))
    args = parser.parse_args(argv)
    device, dtype = default_device_dtype(args.device, args.dtype)
    args.device, args.dtype = device, dtype
    args.repeats = args.repeats or (3 if args.quick else 5)
    cuda = device.type == "cuda"
    wanted = set((args.rows or ("1,2,3,4,5,6,7,8,9,10,11,12,13,14,18,19,20,21,22,23,24" if cuda
                                else "1,2,3,4,5,6,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24")).split(","))
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hw = measure_hardware(device, dtype) if cuda else None
    clock = Clock(device)
    started = time.perf_counter()
    rows = []

    def add(new):  # each row is printed as soon as it is measured, so a long run shows its progress
        for r in new if isinstance(new, list) else [new]:
            rows.append(r)
            print(f"row {r.id}: {r.what}: {r.ratio:.3f}", file=sys.stderr, flush=True)

    if wanted & {"1", "2"}:
        add([r for r in row_encode(args, clock, hw) if r.id in wanted])
    if wanted & {"3", "3b", "4", "6"}:
        ov = arch("llava-ov-0.5b-arch", args)
        if wanted & {"3", "3b"}:
            add(row_prefill(args, clock, hw, ov))
        if "4" in wanted:
            add(row_turn2(args, clock, hw, ov))
        if "6" in wanted:
            add(row_heatmap(args, clock, ov))
        del ov
    if "5" in wanted:
        add(row_kv_bytes(args))
    if "7" in wanted:
        add(row_llava_7b_prefill(args, clock, hw))
    if "8" in wanted:
        add(row_ov_7b_anyres(args, clock, hw))
    if wanted & {"9", "9b"}:
        add(row_sgl(args, clock, hw))
    if "10" in wanted:
        add(row_next_anyres(args, clock, hw))
    if "11" in wanted:
        add(row_internvl(args, clock, hw))
    if "12" in wanted:
        add(row_qwen_prefill(args, clock, hw))
    if "13" in wanted:
        add(row_qwen_encode(args, clock))
    if "14" in wanted:
        add(row_bf16_quality(args))
    if wanted & {"15", "16", "17"}:
        add([r for r in row_cpu_first_turn(args, clock, hw) if r.id in wanted])
    if "18" in wanted:
        add(row_context_edge(args, clock))
    if "19" in wanted:
        add(row_identical_crops(args, clock))
    if "20" in wanted:
        add(row_example(args, clock))
    def chosen(rows_of, prefixes):  # "21" asks for 21a..21e; "21b" for that one
        picked = {p for p in prefixes if any(w == p or (w.startswith(p) and w[len(p):].isalpha()) for w in wanted)}
        return [r for r in rows_of() if r.id in wanted or r.id.rstrip("abcde") in wanted] if picked else []

    add(chosen(lambda: row_selection(args, clock), ("21", "22")))
    add(chosen(lambda: row_equal_budget_prefill(args, clock, hw, arch("llava-ov-0.5b-arch", args)), ("23",)))
    add(chosen(lambda: row_in_llm_first_turn(args, clock, hw), ("24",)))
    if any(w.rstrip("abcd") in {"25", "26", "27"} for w in wanted):  # vLLM serving (bench_serving.py)
        from .bench_serving import serving_rows
        add(serving_rows(args, arch, Row, wanted))
    rows.sort(key=lambda r: (int("".join(ch for ch in r.id if ch.isdigit())), r.id))

    import transformers
    meta = {
        "device": device.type, "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "quick": args.quick,
        "smoke": args.smoke,
        "repeats": args.repeats, "command": "python -m pipeline.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hw, "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    table = markdown(rows, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.type}{'-smoke' if args.smoke else '-quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": [dict(asdict(r), ratio=r.ratio, met=r.met) for r in rows]}, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\n({meta['seconds']} s; written to {out / stem}.json and .md)")


if __name__ == "__main__":
    main()
