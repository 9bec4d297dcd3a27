"""HiPrune (Liu et al., ACL 2026 Findings, arXiv 2508.00553): anchors, buffers and registers from the vision
encoder's own hierarchy of attention. Text-agnostic and CLS-free: an image is compressed once.

The statistic: a layer's global attention, g_l(j) = mean over heads and over every query i (CLS included) of
softmax(q_i . k_j * scale), read at patch j (a unit of several patches: their mean). Per crop, budget B:
  1. anchors: the top round(B x alpha / 5) patches by g at the object layer l (alpha: the anchors' and
     buffers' share, default 0.1);
  2. buffers: each anchor's 4 neighbours in the crop's grid (up, down, left, right);
  3. registers: the top B - |anchors u buffers| of the other patches by g at the output layer (the feature
     layer the projector reads).
Kept = anchors u buffers u registers, each sent as itself in index order; the CLS token is never sent.
Float32, ties to the lowest index (as every zipchat method).

The object layer (1-indexed, as the authors count): their defaults are 9 for CLIP ViT-L (24 layers) and 16 for
Qwen2.5-VL's ViT (32 blocks); the same rule (the middle layers that attend to objects) gives round(24 x 9/24)
= 9 for InternViT-300M and round(26 x 9/24) = 10 for SigLIP-so400m; 0 chooses this default. Where zipchat
departs from the authors' code (Danielement321/HiPrune, `llava_arch.encode_images`): a buffer is a grid
neighbour (their flat index +-1 wraps to the next row at a row's edge); where anchors and buffers exceed the
budget (B below 5 / alpha), anchors then buffers are kept by object-layer attention up to B (theirs fails);
the two layers' attention is computed from those layers' inputs alone (their code runs every layer eager).
"""

import torch

from ..errors import InputError
from .base import CropInput, Pick, pruned, ranked
from .registry import COMPRESS_ONCE, Knob, MapWords, Method, register

ALPHA = 0.1
OBJECT_SHARE = {"qwen2_5_vl": 16 / 32}  # the object layer's depth share; others: CLIP ViT-L's 9 of 24
DEFAULT_SHARE = 9 / 24
ANCHOR, BUFFER, REGISTER = 1, 2, 3  # Pick.kinds: what each kept patch is (0: not kept)
KIND_NAMES = {ANCHOR: "anchor", BUFFER: "buffer", REGISTER: "register"}

KNOBS = (Knob("hiprune_alpha", "HiPrune anchor + buffer share (alpha)", 0.0, 1.0, ALPHA, step=0.05,
              help="the share of the budget that goes to anchors and their neighbours"),
         Knob("hiprune_object_layer", "HiPrune object layer (0: the family's default)", 0, 48, 0, step=1,
              integer=True, help="the vision layer (1-indexed) whose attention picks the anchors"))


def object_layer(family, chosen: int = 0) -> int:
    """The object layer, 1-indexed: `chosen`, or the family's default; below the feature layer."""
    depth = family.num_layers_to_run  # layers up to and including the feature (output) layer
    layer = int(chosen) or max(1, round(family.vision_depth * OBJECT_SHARE.get(family.name, DEFAULT_SHARE)))
    if not 1 <= layer < depth:
        raise InputError(f"HiPrune's object layer must be between 1 and {depth - 1} for this model (its vision "
                         f"tower's output layer is layer {depth}); got {layer}.")
    return layer


def attention_layers(family, knobs: dict) -> tuple:
    """The tower layers (0-based) whose global attention HiPrune reads: the object layer and the output layer."""
    return object_layer(family, knobs.get("hiprune_object_layer", 0)) - 1, family.num_layers_to_run - 1


def select(object_scores: torch.Tensor, output_scores: torch.Tensor, grid: tuple, budget: int,
           alpha: float = ALPHA) -> tuple:
    """Per-patch global attention at the object and output layers (N,), the patch grid, the budget ->
    (anchors, buffers, registers): patch indices, each in selection order."""
    n = object_scores.shape[0]
    budget = min(budget, n)
    rows, cols = grid
    by_object = ranked(object_scores)
    anchors = by_object[:round(budget * alpha / 5)]
    taken = torch.zeros(n, dtype=torch.bool, device=object_scores.device)
    taken[anchors] = True
    buffers = []
    for a in anchors.tolist():
        r, c = divmod(a, cols)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < rows and 0 <= cc < cols and not taken[rr * cols + cc]:
                taken[rr * cols + cc] = True
                buffers.append(rr * cols + cc)
    buffers = torch.tensor(buffers, dtype=torch.long, device=object_scores.device)
    if len(anchors) + len(buffers) > budget:  # a budget below 5 / alpha: the most attended of them, anchors first
        order = ranked(object_scores[buffers]) if len(buffers) else buffers
        anchors = anchors[:budget]
        buffers = buffers[order][:budget - len(anchors)]
        taken[:] = False
        taken[anchors] = True
        taken[buffers] = True
    rest = torch.where(taken, torch.tensor(-torch.inf, device=output_scores.device), output_scores.float())
    registers = ranked(rest)[:budget - len(anchors) - len(buffers)]
    return anchors, buffers, registers


def pick(crop: CropInput) -> Pick:
    object_layer_index, output_layer_index = crop.attention_layers
    patches = slice(crop.offset, None)
    object_scores = crop.received[object_layer_index][patches]
    output_scores = crop.received[output_layer_index][patches]
    anchors, buffers, registers = select(object_scores, output_scores, crop.grid, crop.budget,
                                         crop.knobs.get("hiprune_alpha", ALPHA))
    picked = pruned(crop, torch.cat([anchors, buffers, registers]), scores=output_scores)
    kinds = torch.zeros(crop.grid[0] * crop.grid[1], dtype=torch.long, device=anchors.device)
    for kind, members in ((ANCHOR, anchors), (BUFFER, buffers), (REGISTER, registers)):
        kinds[members] = kind
    picked.kinds = kinds
    return picked


register(Method("hiprune", "HiPrune", COMPRESS_ONCE, pick=pick, attention_layers=attention_layers, knobs=KNOBS,
                kinds=KIND_NAMES,
                words=MapWords(tokens="patches (anchors, their neighbours, registers)"),
                doc="anchors by a middle layer's attention, their neighbours, and registers by the output "
                    "layer's"))
