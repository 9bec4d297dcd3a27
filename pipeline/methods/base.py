"""What a compress-once method is: one crop's vision output in, the tokens the LLM receives out.

A method is a function `pick(crop: CropInput) -> Pick`, registered in `methods/__init__.py`. It sees
the crop's units as VisionZip does (the feature layer's outputs, CLS first where the tower has one),
VisionZip's attention statistic and keys, and the family's projector; it sends at most the crop's
budget B = dominant + contextual tokens (`Family.budget`). Text-agnostic: the same image gives the
same tokens on every turn, so the image is compressed once and the KV cache is reused.

Rules shared by the pruning methods: candidates are the crop's patch units (a CLS token is never
sent by them), selection arithmetic is float32, ties go to the lowest unit index, and the kept units
are sent in index order.
"""

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class CropInput:
    units: torch.Tensor  # (U, C) feature-layer units (the projector's input), CLS first when has_cls
    scores: torch.Tensor  # (U,) VisionZip's attention statistic per unit
    keys: torch.Tensor  # (U, d) keys per unit, averaged over heads
    has_cls: bool
    grid: tuple  # (rows, cols) of the patch units (CLS excluded)
    dominant: int  # this crop's VisionZip split; the budget is dominant + contextual
    contextual: int
    seed: int  # the image's content digest (first 15 hex digits) as an integer, plus the crop index
    project: Callable  # (k, C) -> (k, D): the family's projector on units of this crop
    project_parts: tuple | None = None  # (inner, last): project == last(inner(.)), `last` affine (Family)
    received: dict = field(default_factory=dict)  # tower layer (0-based) -> (U,) its global attention per unit:
    # mean over heads and queries (CLS included) of the attention each unit receives (Method.attention_layers)
    attention_layers: tuple = ()  # the layers in `received`, in the order the method asked for them
    knobs: dict = field(default_factory=dict)  # the method's own settings (Method.knobs), defaults filled in
    relevance: torch.Tensor | None = None  # (N,) a question-conditioned method's relevance of each patch to the
    # turn's question (Method.relevance), None for the others

    @property
    def budget(self) -> int:
        return self.dominant + self.contextual

    @property
    def offset(self) -> int:
        return 1 if self.has_cls else 0

    @property
    def patches(self) -> torch.Tensor:
        """(N, C) the candidate units of the pruning methods: every unit but CLS."""
        return self.units[self.offset:]

    @property
    def patch_scores(self) -> torch.Tensor:
        return self.scores[self.offset:]


@dataclass
class Pick:
    """What a method sends for one crop, and what the maps draw."""
    tokens: torch.Tensor  # (n, C) units for the projector, or (n, D) tokens already projected
    projected: bool
    token_patches: torch.Tensor  # (n,) patch index each token stands at (-1: CLS), in sending order
    token_groups: torch.Tensor  # (n,) merged-token id of each token, -1 for a unit sent as itself
    kept: torch.Tensor  # (k,) patch indices sent as themselves, index order (CLS excluded)
    includes_cls: bool
    groups: torch.Tensor  # (rows*cols,) per patch: -1 sent as itself, g merged into token g, -2 not sent
    targets: torch.Tensor  # (c,) VisionZip: the target patch of each contextual token (ringed on the map)
    scores: torch.Tensor | None  # (rows*cols,) what the score map shows, None where the method has no score
    kinds: torch.Tensor | None = None  # (rows*cols,) what each kept patch is (Method.kinds), 0 not kept; None: one kind


FULL_MATRIX = 8192  # up to this many units, similarity matrices are computed whole, in one product


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, N) float32 cosine similarities, in one matrix product (rows normalised first)."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.T


def ranked(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending value, ties to the lowest index (torch.topk does not promise that)."""
    return torch.sort(values.float(), descending=True, stable=True).indices


def pruned(crop: CropInput, kept: torch.Tensor, tokens: torch.Tensor | None = None, scores=None) -> Pick:
    """A Pick of patches sent as themselves (`kept`: patch indices, any order): their units for the
    projector, or `tokens` already projected in index order."""
    kept = kept.sort().values
    groups = torch.full((crop.grid[0] * crop.grid[1],), -2, dtype=torch.long, device=kept.device)
    groups[kept] = -1
    empty = torch.zeros(0, dtype=torch.long, device=kept.device)
    return Pick(tokens=crop.patches[kept] if tokens is None else tokens, projected=tokens is not None,
                token_patches=kept, token_groups=torch.full_like(kept, -1), kept=kept, includes_cls=False,
                groups=groups, targets=empty, scores=scores)


def units_view(comp, units: list, method: str, num_tokens: int | None = None):
    """`comp` as drawn for a method that sends exactly `units` (per crop: patch indices) as themselves and
    no other unit (the manual picks; FastV's and SGL's kept tokens). For the maps: its features are not
    the model's. `num_tokens`: the tokens the method sends, where they are not one per unit."""
    crops = []
    for c, picked in zip(comp.crops, units):
        picked = np.array(sorted(picked), dtype=np.int64)
        groups = np.full(c.grid[0] * c.grid[1], -2)  # -2: not sent
        groups[picked] = -1
        crops.append(replace(c, kept=picked, includes_cls=False, groups=groups, targets=np.zeros(0, np.int64)))
    token_map = np.array([(i, u, -1) for i, c in enumerate(crops) for u in c.kept], dtype=np.int64).reshape(-1, 3)
    return replace(comp, method=method, crops=crops, token_map=token_map, features=comp.features[:0],
                   num_tokens=len(token_map) if num_tokens is None else num_tokens)
