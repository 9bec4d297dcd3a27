"""VisionZip selection for one crop: dominant tokens by attention, contextual tokens by key merging.

Pure tensor functions (Yang et al., CVPR 2025; the rule as docs/methods.md states it):
  1. score per token (computed by the family, families/, from the feature layer's own attention);
  2. dominant = CLS + top (dominant - 1) patches, or the top `dominant` tokens without CLS;
  3. metric = the layer's keys averaged over heads, L2-normalised;
  4. the remaining tokens, in index order: every `step`-th is a target (the first `contextual`
     of them), every other joins its most similar target; contextual = X[target] + mean(joined);
  5. order: dominant in index order (CLS first), then contextual in target order.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .base import Pick
from .registry import COMPRESS_ONCE, MapWords, Method, register

BUDGETS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # total tokens per crop -> (dominant, contextual)


@dataclass
class Selection:
    tokens: torch.Tensor  # (dominant + contextual, C): what the projector receives
    dominant: torch.Tensor  # (dominant,) token indices in index order (CLS = 0 when present)
    targets: torch.Tensor  # (contextual,) token index of each contextual token's target
    groups: torch.Tensor  # (T,) contextual id of each token, -1 for dominant tokens, -2 for dropped ones (no
    # contextual tokens)


def check_budget(dominant: int, contextual: int, num_tokens: int, has_cls: bool):
    if dominant < 1 or contextual < 0:
        raise InputError(f"The VisionZip budget needs at least 1 dominant token (got {dominant}+{contextual}).")
    if dominant + contextual > num_tokens:
        kind = "CLS + patches" if has_cls else "patches"
        raise InputError(
            f"The VisionZip budget {dominant}+{contextual} = {dominant + contextual} tokens is larger than "
            f"the {num_tokens} visual tokens ({kind}) of one crop of this model. Choose a smaller budget."
        )


def select(x: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int,
           has_cls: bool) -> Selection:
    """x (T, C) feature-layer tokens, scores (T,), keys (T, d) -> Selection for one crop."""
    T = x.shape[0]
    check_budget(dominant, contextual, T, has_cls)
    if has_cls:
        top = scores[1:].topk(dominant - 1).indices + 1  # patches only; CLS is always kept
        dom = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), top])
    else:
        dom = scores.topk(dominant).indices
    dom = dom.sort().values

    keep = torch.ones(T, dtype=torch.bool, device=x.device)
    keep[dom] = False
    remaining = keep.nonzero().squeeze(1)  # (R,) in index order
    groups = torch.full((T,), -1, dtype=torch.long, device=x.device)
    if contextual == 0:  # the rest is dropped
        groups[remaining] = -2
        return Selection(x[dom], dom, remaining[:0], groups)

    step = max(1, remaining.numel() // contextual)
    target_pos = torch.arange(0, remaining.numel(), step, device=x.device)[:contextual]  # positions in `remaining`
    targets = remaining[target_pos]
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=x.device)
    is_target[target_pos] = True
    others = remaining[~is_target]

    metric = F.normalize(keys.float(), dim=-1)
    similarity = metric[others] @ metric[targets].T  # (others, contextual)
    assign = similarity.argmax(dim=1)  # (others,) contextual id each other token joins
    groups[targets] = torch.arange(contextual, device=x.device)
    groups[others] = assign

    return Selection(gather(x, dom, targets, groups), dom, targets, groups)


def gather(x: torch.Tensor, dom: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Tokens of a selection from features x (T, C): X[dominant], then X[target] + mean(X[joined]).

    Used by `select`, and to apply one model's selection to another model's features (SGL + VisionZip)."""
    contextual = targets.numel()
    if contextual == 0:
        return x[dom]
    joined = groups >= 0
    joined[targets] = False
    others, assign = joined.nonzero().squeeze(1), groups[joined]
    sums = torch.zeros(contextual, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x[others])
    counts = torch.bincount(assign, minlength=contextual).to(x.dtype).unsqueeze(1)
    merged = x[targets] + sums / counts.clamp(min=1)  # X[target] alone when nothing joined (sum is 0)
    return torch.cat([x[dom], merged])


def pick(crop) -> Pick:
    """VisionZip as a method (methods/base.py): dominant units as themselves, then contextual tokens."""
    sel = select(crop.units, crop.scores, crop.keys, crop.dominant, crop.contextual, crop.has_cls)
    o = crop.offset
    dom = sel.dominant
    return Pick(tokens=sel.tokens, projected=False,
                token_patches=torch.cat([dom - o, sel.targets - o]),
                token_groups=torch.cat([torch.full_like(dom, -1), torch.arange(len(sel.targets), device=dom.device)]),
                kept=dom[dom >= o] - o, includes_cls=bool(o and (dom == 0).any()), groups=sel.groups[o:],
                targets=sel.targets - o, scores=crop.patch_scores)


def caption(comp) -> str:
    """"54 dominant + 10 contextual x 3 crops = 192 of 1836 visual tokens (10%)"."""
    share = 100 * comp.num_tokens / comp.full_tokens
    kept = {(len(c.kept) + c.includes_cls, len(c.targets)) for c in comp.crops}
    if kept == {(comp.dominant_budget, comp.contextual_budget)}:
        per_crop = f"{comp.dominant_budget} dominant + {comp.contextual_budget} contextual"
        crops = f" x {len(comp.crops)} {comp.crop_word}" if len(comp.crops) > 1 else ""
    else:  # a share of each image's units (dynamic resolution)
        d, c = (sum(k) for k in zip(*((len(c.kept) + c.includes_cls, len(c.targets)) for c in comp.crops)))
        per_crop = f"{d} dominant + {c} contextual (the {comp.dominant_budget}+{comp.contextual_budget} per 576 share)"
        crops = f" in {len(comp.crops)} {comp.crop_word}" if comp.times else ""
    return f"{per_crop}{crops} = {comp.num_tokens} of {comp.full_tokens} visual tokens ({share:.0f}%)"


register(Method("visionzip", "VisionZip", COMPRESS_ONCE, pick=pick, caption=caption,
                words=MapWords(kept="dominant", faded="faded: not sent as itself (merged or dropped)"),
                doc="dominant tokens by attention, the rest merged into contextual tokens"))
