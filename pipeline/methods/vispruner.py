"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818): important tokens by attention, then diverse ones.

a = the feature layer's attention each patch gets (the CLS row where the tower has CLS: VisionZip's
statistic, whose sum over heads ranks as the heads' mean; without CLS the attention received).
  1. important = the top floor(B x important_ratio) patches by a;
  2. residual = the other patches in descending a. Rounds, while R residual tokens are more than the
     B - important still to fill: n = min(8, R - (B - important)); on the unit-normalised X of the
     residual, a-set = even positions, b-set = odd positions, s(a) = max over b of cos(a, b); drop
     the n a's with the highest s; the next residual is the remaining a's by descending s, then the b's
     in their order.
Kept = important + residual, sent as themselves in index order (projector(X[kept])). Float32; ties
to the lowest unit index. The cosines do not change between rounds: one N x N matrix (up to
FULL_MATRIX units) serves them all.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import FULL_MATRIX, CropInput, Pick, cosine_matrix, pruned, ranked
from .registry import COMPRESS_ONCE, MapWords, Method, register

IMPORTANT_RATIO = 0.5
ROUND = 8  # duplicates removed per round at most


def select(x: torch.Tensor, attention: torch.Tensor, budget: int, important_ratio: float = IMPORTANT_RATIO
           ) -> torch.Tensor:
    """x (N, C) units, attention (N,) -> kept unit indices (unsorted)."""
    order = ranked(attention)
    budget = min(budget, x.shape[0])
    n_important = int(math.floor(budget * important_ratio))
    important, residual = order[:n_important], order[n_important:]
    need = budget - n_important
    # the similarities do not change between rounds (only which tokens are a's and b's): one matrix, and
    # the rounds (many small steps) in numpy, where a step costs microseconds
    whole = cosine_matrix(x).cpu().numpy() if x.shape[0] <= FULL_MATRIX else None  # (N, N) float32
    unit = F.normalize(x.float(), dim=-1) if whole is None else None
    residual = residual.cpu().numpy()
    while True:
        n = min(ROUND, len(residual) - need)
        if n <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        if not len(b):
            s = np.full(len(a), -np.inf, dtype=np.float32)
        elif whole is not None:
            s = whole[a][:, b].max(axis=1)  # (|a|,): rows, then columns (faster than one 2-d fancy index)
        else:
            s = (unit[torch.as_tensor(a)] @ unit[torch.as_tensor(b)].T).max(dim=1).values.cpu().numpy()
        by_s = np.lexsort((a, -s))  # descending s, ties to the lowest unit index
        residual = np.concatenate([a[by_s[min(n, len(a)):]], b])
    return torch.cat([important, torch.as_tensor(residual, dtype=torch.long, device=important.device)])


def pick(crop: CropInput) -> Pick:
    attention = crop.patch_scores
    kept = select(crop.patches, attention, crop.budget)
    return pruned(crop, kept, scores=attention)


register(Method("vispruner", "VisPruner", COMPRESS_ONCE, pick=pick,
                words=MapWords(tokens="patches (important by attention, then diverse)"),
                doc="important patches by attention, then diverse ones"))
