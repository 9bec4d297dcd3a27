"""SGL (Zhao et al., arXiv 2412.03324): a small VLM guides the large one.

  1. The small model S answers with all visual tokens. importance(j) = attention paid to visual
     token j, summed over all layers and heads, by every token of the turn that comes after the
     last visual token: the question's tokens and S's answer tokens (each answer token once it is
     fed back, i.e. all but the last).
  2. Early exit: confidence = geometric mean over S's answer of the max token probability;
     consistency = geometric mean of the probabilities of S's own answer tokens when S re-scores
     it keeping only the top 5% visual tokens; score = (confidence + consistency) / 2.
  3. The large model G runs layers < K = floor(prune_layer x layers) on all tokens, then only the
     top max(1, floor(keep_ratio x visual)) visual tokens (original positions kept) — see
     `generate.forward_layers`.

The importance is read without eager attention: per-instance hooks capture each layer's queries
(`q_proj` output) and rotary (cos, sin); after the layer ran, its post-rotary keys are in S's KV
cache, so only the needed rows softmax(q K^T / sqrt(d)) are computed.
"""

import math
import time

import numpy as np
import torch
from PIL import Image

from ..chat import Message
from ..errors import InputError
from ..engines.base import Usage
from ..generate import embed, forward_layers, new_cache
from .capture import Guidance, ImportanceCapture
from .llm_prune import image_spans, keep_count, visual_positions
from .registry import IN_LLM, Knob, Method, register

CONSISTENCY_KEEP = 0.05  # the paper's re-scoring keeps the top 5% visual tokens


def probe_image() -> Image.Image:
    """A fixed, non-square test card (it selects several anyres tiles)."""
    y, x = np.mgrid[0:360, 0:520]
    rgb = np.stack([x * 255 // 520, y * 255 // 360, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def check_pair(small, large):
    """Refuse an SGL pair whose visual-token layouts (count and grid per crop) or chat formats differ.
    Only the preprocessing and the tokenizers run, so this is cheap and needs no GPU."""
    checked = large.extra.setdefault("sgl_pairs_checked", set())
    if small.name in checked:
        return
    probe = probe_image()
    s_layout, g_layout = full_layout(small, probe), full_layout(large, probe)
    if s_layout != g_layout:
        raise InputError(
            f"SGL needs two models with the same visual-token layout, but '{small.name}' gives {describe(s_layout)} "
            f"and '{large.name}' gives {describe(g_layout)} for the same image. Choose a matching pair "
            "(llava-ov-0.5b -> llava-ov-7b, llava-1.5-7b -> llava-1.5-13b, tiny-ov-small -> tiny-ov-large)."
        )
    chat = [Message("user", "What is in the image?", ["probe"]), Message("assistant", "A cat."), Message("user", "Sure?")]
    if small.chat.render(chat) != large.chat.render(chat) or small.image_token_id != large.image_token_id:
        raise InputError(f"SGL needs one tokenizer for both models; '{small.name}' and '{large.name}' differ.")
    checked.add(small.name)


def full_layout(vlm, image) -> tuple:
    """(visual tokens, grid of each crop) of an image without compression: what must match between
    the two models of an SGL pair. Computed from the preprocessing alone; no model runs."""
    layout = vlm.family.layout(image)
    return len(vlm.family.full_token_map(vlm.model, layout)), tuple(c.grid for c in layout.crops)


def describe(layout) -> str:
    tokens, grids = layout
    tiles = f"{len(grids)} crops of {grids[0][0]}x{grids[0][1]} patches" if grids else "no crops"
    return f"{tokens} visual tokens ({tiles})"


def geometric_mean(probs: list) -> float:
    if not probs:
        return 0.0
    return float(math.exp(sum(math.log(max(p, 1e-12)) for p in probs) / len(probs)))


def top_k_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(importance, dtype=torch.bool)
    if k > 0:
        mask[importance.topk(min(k, importance.numel())).indices] = True
    return mask


def sgl_answer(ctx):
    """One SGL turn (turn.TurnContext): a generator of text deltas; returns the answer ids. The small model
    answers and ranks, the exit score decides, and the pruned large model answers if needed."""
    small, large, plan, s = ctx.small, ctx.large, ctx.plan, ctx.settings
    visual = visual_positions(large, plan.ids)
    # rows counted: this turn's tokens after the last visual token (not re-prefilled earlier turns)
    after = max(int(visual[-1]) if visual.numel() else -1, plan.turn_start - 1)

    # 1. The small model answers with all visual tokens; hooks collect the importance.
    t_small, usage, max_probs, capture = time.perf_counter(), Usage(), [], []

    def watch(cache):
        capture.append(ImportanceCapture(small, cache, visual.to(small.device), after))
        return capture[0]
    small_tokens = ctx.collect(ctx.request("small", watch=watch, max_probs=max_probs), usage=usage)
    importance = capture[0].importance.cpu()
    small_s = time.perf_counter() - t_small
    stats = ctx.stats
    stats.timings.update(small_answer_s=small_s, small_prefill_tokens=usage.prompt_tokens - usage.cached_tokens,
                         small_cache_reused=usage.cached_tokens > 0)

    # 2. Early exit: confidence and consistency (re-scoring with the top 5% visual tokens).
    t_score = time.perf_counter()
    confidence = geometric_mean(max_probs[: len(small_tokens)])
    consistency = rescored_probability(small, plan.small_ids, plan.small_slots, visual, importance, small_tokens)
    score = (confidence + consistency) / 2
    stats.timings["small_score_s"] = time.perf_counter() - t_score
    exit_now = s.early_exit is not None and score >= s.early_exit and not ctx.stop_flag.is_set()

    k_layer = int(math.floor(s.prune_layer * len(large.language_model.layers)))
    keep_visual = top_k_mask(importance, keep_count(s.keep_ratio, visual.numel()))
    stats.guidance = Guidance(
        importance=importance.numpy(), kept=keep_visual.nonzero().squeeze(1).numpy(), confidence=confidence,
        consistency=consistency, score=score, threshold=s.early_exit, early_exit=exit_now,
        small_answer=small.tokenizer.decode(small_tokens, skip_special_tokens=True), small_tokens=small_tokens,
        prune_layer=k_layer, image_spans=image_spans(plan.slots), rows=capture[0].rows)
    stats.early_exit = exit_now
    if exit_now:
        return (yield from early_exit(ctx, small_tokens, usage, small_s))

    # 3. The large model: all tokens up to layer K, then the kept visual tokens only (engines/transformers.py).
    keep = torch.ones(len(plan.ids), dtype=torch.bool)
    keep[visual] = keep_visual
    t_large = time.perf_counter()
    answer = yield from ctx.answer(ctx.request(prune=(k_layer, keep)))
    stats.timings["large_s"] = time.perf_counter() - t_large
    return answer


def early_exit(ctx, small_tokens: list, usage, small_s: float):
    """The small model's answer is the answer; the large model is not run."""
    stats = ctx.stats
    stats.model_used = ctx.small.name
    stats.prefill_tokens = stats.timings["small_prefill_tokens"]
    stats.cache_reused = usage.cached_tokens > 0
    stats.ttft_s = time.perf_counter() - ctx.t0
    if len(small_tokens) > 1:  # (the first token came with the prefill)
        stats.decode_tok_per_s = (len(small_tokens) - 1) / max(small_s - usage.prefill_s, 1e-9)
    ctx.generated.extend(small_tokens)
    if stats.guidance.small_answer:
        yield stats.guidance.small_answer
    return list(small_tokens)


@torch.inference_mode()
def rescored_probability(small, s_ids, s_slots, visual, importance, answer) -> float:
    """Geometric mean probability of the small model's own answer when it re-reads the
    conversation keeping only its top 5% visual tokens (original positions kept)."""
    if not answer:
        return 0.0
    keep = torch.ones(len(s_ids) + len(answer) - 1, dtype=torch.bool)
    if visual.numel():
        keep[visual] = top_k_mask(importance, max(1, math.ceil(CONSISTENCY_KEEP * visual.numel())))
    feats = [u.features for u in s_slots if u.features is not None]
    embeds = embed(small, s_ids + answer[:-1], feats)
    prompt = small.family.positions(s_ids, s_slots)  # (P, L); the answer continues after its largest
    after = int(prompt.max()) + 1 + torch.arange(len(answer) - 1)
    positions = torch.cat([prompt, after.expand(prompt.shape[0], -1)], dim=1)
    logits = forward_layers(small, embeds, positions, new_cache(small), prune_at=0, keep=keep.to(small.device),
                            last=len(answer))
    probs = torch.softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer)]
    return geometric_mean(probs.tolist())


def stats_rows(t) -> list:
    """An SGL turn's own rows in the stats: who answered, the exit score, what the large model kept, the time
    each model took."""
    g = t.guidance
    if g is None:
        return []
    ms = {k: v * 1000 for k, v in t.timings.items() if k.endswith("_s")}
    threshold = "off" if g.threshold is None else f"{g.threshold:.2f}"
    return [
        ("SGL: answered by", f"{t.model_used} ({'early exit' if t.early_exit else 'large model, pruned'})"),
        ("SGL: exit score (threshold)", f"{g.score:.3f} = ({g.confidence:.3f} + {g.consistency:.3f}) / 2 ({threshold})"),
        ("SGL: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer {g.prune_layer}"),
        ("SGL: small model", f"{ms.get('small_answer_s', 0):.0f} ms answer + {ms.get('small_score_s', 0):.0f} ms score"
                             + (", its KV cache reused" if t.timings.get("small_cache_reused") else "")),
        ("SGL: large model", f"{ms['large_s']:.0f} ms" if "large_s" in ms else "not run"),
    ]


KNOBS = (Knob("keep_ratio", "SGL keep ratio", 0, 1, 0.35, above_zero="a share of the visual tokens, at most 1",
              help="share of the visual tokens the large model keeps from layer K on"),
         Knob("prune_layer", "prune layer", 0, 1, 0.4, step=0.05, help="K as a fraction of the large model's depth"))

register(Method("sgl", "SGL", IN_LLM, answer=sgl_answer, images=lambda settings: settings.sgl_tokens,
                engines=("transformers",), needs_small=True, stats_rows=stats_rows, knobs=KNOBS, share_knob="keep_ratio",
                doc="a small model answers first and ranks the visual tokens; the large model prunes the rest"))
