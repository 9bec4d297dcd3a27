"""Rows of the answer as a person on a CPU meets it: bf16 vs float32 (14), the first answer (15-17), past
the context edge (18), an example answered from the cache (20)."""

import argparse
import statistics
from pathlib import Path

import torch
from PIL import Image

from ..compress import encode_image
from ..models import cpu_native_bf16, load_vlm
from ..session import ChatSession
from .core import ASSETS, QUESTION, Row, arch, ov_image, row, side_by_side


def answer_ids(vlm, image, n: int) -> list:
    """The first `n` greedy answer ids about `image` (the KV cache's record of the answer fed back)."""
    s = ChatSession(vlm, method="visionzip", max_new_tokens=n, stop_at_eos=False)
    s.add_image(image)
    s.ask(QUESTION)
    return [k[1] for k in s.kv.signature(s.state.session_id, "large")[-(n - 1):]]  # the answer fed back


@row('14', title='bf16 vs float32 answers')
def row_bf16_quality(b) -> Row:
    """14: bf16 vs float32, on the tiny models (every CPU; the architecture presets where bf16 is native or
    on a GPU): share of dominant tokens both select on the four example images, and how many greedy
    answer tokens agree (random weights have no margin between tokens: a lower bound)."""
    args = b.args
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
                overlaps[name].append(len(set(x.kept) & set(y.kept)) / len(x.kept))
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


@row('15', '16', '17', title='first answer on a CPU: bf16, tile cap, decode', where='cpu')
def row_cpu_first_turn(b) -> list:
    """15-17: what a free CPU Space sees with llava-ov-0.5b: first-turn time to first token (image encode
    + compress + prefill) at 384 px in the default dtype vs float32 (15); decode tokens per second
    against the bytes each token reads (16); the first turn on a 1152x1152 photo with the CPU's tile cap
    (base + up to 2x2 tiles) vs all the tiles the checkpoint uses (3x3) (17)."""
    args, clock = b.args, b.clock
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


@row('18', title='time to first token past the context edge')
def row_context_edge(b) -> Row:
    """18: a long conversation at the context edge: the mean time to first token of 10 turns past the edge
    (what a person waits before each answer starts), dropping the oldest turns down to 3/4 of the window when
    a turn does not fit (the following turns reuse the cache) vs one turn at a time (every turn past the
    edge prefills the whole conversation again); the whole turns' mean in the notes. The two
    conversations advance turn by turn, alternating."""
    args, clock = b.args, b.clock
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


@row('20', title='an example answered from the cache')
def row_example(b) -> Row:
    """20: the first answer about an example image, compressed ahead (examples.py), vs about a new image of
    the same size (the example mirrored): time to the first token, the image's decode included."""
    args, clock = b.args, b.clock
    import tempfile
    from PIL import ImageOps
    from ..examples import ExampleCache
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
