"""Rows of the language model's prefill: VisionZip vs Full per family (3, 7, 8, 10-12), turn 2 with KV reuse
(4), KV-cache bytes (5), every compress-once method at the same budget (23)."""

import torch
from PIL import Image

from ..chat import Message
from ..generate import embed, forward, new_cache
from ..kvstore import cache_nbytes
from ..models import load_vlm
from ..session import ChatSession
from .core import (ASSETS, QUESTION, Row, arch, floor_s, llm_prefill_cost, ov_image, prefill_inputs,
                   prefill_timer, qwen_preset, row, side_by_side, turn_two_timer)


@row('3', '3b', title='OneVision-0.5B prefill, VisionZip vs Full')
def row_prefill(b) -> list:
    """3: LLM prefill VisionZip-64 vs full on llava-ov-0.5b-arch (one 384 image; 2x2 tiles)."""
    args, clock, hw = b.args, b.clock, b.hw
    vlm = b.model("llava-ov-0.5b-arch")
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


@row('4', title='turn 2 with KV reuse vs recomputing')
def row_turn2(b) -> Row:
    """4: turn-2 TTFT with KV reuse vs recomputing the whole conversation (full tokens)."""
    args, clock, hw = b.args, b.clock, b.hw
    vlm = b.model("llava-ov-0.5b-arch")
    image = ov_image(1)
    sessions = {}
    for reuse in (True, False):
        s = ChatSession(vlm, method="full", max_new_tokens=8, reuse_cache=reuse)
        if sessions:
            s.state.compressions = next(iter(sessions.values())).state.compressions
        s.add_image(image)
        s.ask(QUESTION)
        sessions[reuse] = s
    timers = {reuse: turn_two_timer(s, "And what colours dominate?") for reuse, s in sessions.items()}
    ta, tb = side_by_side(clock, timers[True], timers[False], args.repeats)
    s = sessions[True]
    return Row("4", f"turn-2 time to first token, {vlm.name}, full tokens ({s.last_turn.prompt_tokens} in context)",
               f"KV reuse ({s.last_turn.prefill_tokens} new tokens)", "recompute the conversation", ta, tb,
               target="<= 0.1", floor_a_s=floor_s(llm_prefill_cost(vlm, s.last_turn.prefill_tokens,
                                                                     s.last_turn.prompt_tokens), hw),
               floor_b_s=floor_s(llm_prefill_cost(vlm, s.last_turn.prompt_tokens), hw))


@row('5', title='KV-cache bytes, 7B shapes')
def row_kv_bytes(b) -> Row:
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


@row('7', title='LLaVA-1.5-7B prefill', where='cuda')
def row_llava_7b_prefill(b) -> Row:
    """7: llava-1.5-7b-arch, 576 -> 64 visual tokens."""
    args, clock, hw = b.args, b.clock, b.hw
    image = Image.open(ASSETS / "chelsea.png").convert("RGB")
    return row_large_prefill(args, clock, hw, "7", "llava-1.5-7b-arch", image, "one 336 px crop",
                             ("VisionZip-64", "full (576)"), "<= 0.5")


@row('8', title='OneVision-7B anyres prefill', where='cuda')
def row_ov_7b_anyres(b) -> Row:
    """8: llava-ov-7b-arch, a 3x3-tile image (the most tokens full OneVision sends), 64 per crop."""
    args, clock, hw = b.args, b.clock, b.hw
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1152, 1152))
    return row_large_prefill(args, clock, hw, "8", "llava-ov-7b-arch", image, "1152 px image (1 + 3x3 crops)",
                             ("VisionZip 64/crop", "full anyres"), "<= 0.15")


@row('10', title='LLaVA-NeXT anyres prefill')
def row_next_anyres(b) -> Row:
    """10: llava-next-7b-arch at its largest anyres grid (base + 2x2 tiles of 336 px), 64 per crop.
    On a CPU the half-width, half-depth shapes (a 7B model does not fit in float32 here)."""
    args, clock, hw = b.args, b.clock, b.hw
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((672, 672))
    return row_large_prefill(args, clock, hw, "10", "llava-next-7b-arch", image, "672 px image (1 + 2x2 crops)",
                             ("VisionZip 64/crop", "full anyres"), "<= 0.15", quick=args.device.type == "cpu")


@row('11', title='InternVL3 prefill')
def row_internvl(b) -> Row:
    """11: InternVL3 at 1 + 6 tiles (a 3:2 image: 3x2 tiles of 448 px + thumbnail), 64 vs 256 units per
    tile: internvl3-8b-arch on a GPU, internvl3-1b-arch (real shapes) on a CPU."""
    args, clock, hw = b.args, b.clock, b.hw
    image = Image.open(ASSETS / "coffee.png").convert("RGB").resize((1344, 896))
    preset = "internvl3-8b-arch" if args.device.type == "cuda" else "internvl3-1b-arch"
    return row_large_prefill(args, clock, hw, "11", preset, image, "1344x896 image (3x2 tiles + thumbnail)",
                             ("VisionZip 64/tile", "full (256/tile)"), "<= 0.3")


@row('12', title='Qwen2.5-VL prefill')
def row_qwen_prefill(b) -> Row:
    """12: Qwen2.5-VL at 1024x768 (about 1000 image tokens), VisionZip's 64/576 share (11%) vs full."""
    args, clock, hw = b.args, b.clock, b.hw
    image = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1024, 768))
    preset, quick = qwen_preset(args)
    return row_large_prefill(args, clock, hw, "12", preset, image, "1024x768 image", ("VisionZip 11%", "full"),
                             "<= 0.2", quick=quick)


@row('23', title='prefill at equal budget per method')
def row_equal_budget_prefill(b) -> list:
    """23: LLM prefill at VisionZip's budget for the other compress-once methods vs full (as row 3):
    the same number of visual tokens, so the same saving."""
    args, clock, hw = b.args, b.clock, b.hw
    vlm = b.model("llava-ov-0.5b-arch")
    image = ov_image(1)
    full = prefill_inputs(ChatSession(vlm, method="full", max_new_tokens=1), image)
    rows = []
    for k, method in enumerate(("divprune", "vispruner", "random", "pool", "hiprune", "cdpruner")):
        ids, feats = prefill_inputs(ChatSession(vlm, method=method, max_new_tokens=1), image)
        ta, tb = side_by_side(clock, prefill_timer(vlm, ids, feats), prefill_timer(vlm, *full), args.repeats)
        rows.append(Row(f"23{'abcdef'[k]}", f"LLM prefill, {vlm.name}, {image.width}px image, {method} at 54+10 per "
                        f"crop ({sum(len(f) for f in feats)} vs {sum(len(f) for f in full[1])} visual tokens)",
                        method, "full", ta, tb, target="<= 0.2",
                        floor_a_s=floor_s(llm_prefill_cost(vlm, len(ids)), hw),
                        floor_b_s=floor_s(llm_prefill_cost(vlm, len(full[0])), hw)))
    return rows


@row('28', title="turn 2's time to first token: a kept set reused vs selected again (DART, CDPruner)")
def row_turn2_reuse_vs_reselect(b) -> list:
    """28: a second question on the same image (the first answered, 1 new token each), turn 2's time to first
    token as the turn reports it: VisionZip and HiPrune reuse their compressed image and KV cache; DART (in the
    LLM, at about the same number of visual tokens: keep 128 of 1,485) selects again for the new question and
    rebuilds the cache. 28c: CDPruner (before the LLM, the same 128 tokens) selects again too (from the tower
    output it kept: the relevance, the projection, the DPP) and rebuilds the cache from the image on; against
    VisionZip's reuse."""
    args = b.args
    vlm = b.model("llava-ov-0.5b-arch")
    image = ov_image(1)

    def ttfts(method, **knobs) -> list:
        out = []
        for _ in range(args.repeats + 1):  # (the first is a warm-up)
            s = ChatSession(vlm, max_new_tokens=1)
            s.set_method(method, **knobs)
            s.add_image(image)
            s.ask(QUESTION)
            s.ask("And what colours dominate?")
            out.append(s.last_turn.ttft_s)
        return out[1:]
    dart = ttfts("dart", dart_keep_ratio=128 / 1485)
    rows = []
    for k, method in enumerate(("visionzip", "hiprune")):
        rows.append(Row(f"28{'ab'[k]}", f"turn-2 time to first token, {vlm.name}, {image.width}px image, {method} "
                        "(kept set and KV reused) vs DART (selects again, cache rebuilt)", method, "dart",
                        ttfts(method), dart, target="<= 0.5"))
    rows.append(Row("28c", f"turn-2 time to first token, {vlm.name}, {image.width}px image, CDPruner (selects again "
                    "before the LLM, cache rebuilt from the image) vs VisionZip (kept set and KV reused)", "cdpruner",
                    "visionzip", ttfts("cdpruner"), rows[0].a_s,
                    notes="no target: what selecting again for a new question costs, shown"))
    return rows
