"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): diversity only.

On the crop's projected units P (every patch unit projected: this method's extra cost), with the
cosine distance D[i, j] = 1 - cos(P_i, P_j):
  1. first pick: argmax_i min_{j != i} D[i, j], the unit farthest from its nearest neighbour;
  2. then repeatedly argmax_j min_{i in picked} D[i, j] over the unpicked j, until B are picked.
The picked units' projected tokens are sent, in index order. Float32; ties to the lowest index
(torch.argmax returns the first maximum). Each unit's distance to the picked set is kept and updated
with the newest pick's row, O(B N) after the matrix; past FULL_MATRIX units the matrix is never
held whole (row minima in chunks, one row at a time after).
"""

import torch
import torch.nn.functional as F

from .base import FULL_MATRIX, CropInput, Pick, cosine_matrix, pruned
from .registry import COMPRESS_ONCE, MapWords, Method, register

CHUNK = 1024


def max_min_picks(projected: torch.Tensor, budget: int) -> torch.Tensor:
    """(N, D) -> (min(budget, N),) unit indices in picking order."""
    n = projected.shape[0]
    budget = min(budget, n)
    whole = 1 - cosine_matrix(projected) if n <= FULL_MATRIX else None  # (N, N)
    unit = F.normalize(projected.float(), dim=-1) if whole is None else None

    def distances(start: int, end: int) -> torch.Tensor:  # rows start..end of D
        return whole[start:end] if whole is not None else 1 - unit[start:end] @ unit.T

    nearest = torch.empty(n, device=projected.device)  # min over j != i of D[i, j]
    for s in range(0, n, CHUNK):
        d = distances(s, s + CHUNK).clone()
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        nearest[s:s + CHUNK] = d.min(dim=1).values
    if n == 1:
        nearest[0] = 0.0
    picks = [int(torch.argmax(nearest))]
    to_picked = distances(picks[0], picks[0] + 1)[0].clone()  # (N,) min over the picked i of D[i, j]
    taken = torch.zeros(n, dtype=torch.bool, device=projected.device)
    taken[picks[0]] = True
    for _ in range(budget - 1):
        j = int(torch.argmax(to_picked.masked_fill(taken, float("-inf"))))
        picks.append(j)
        taken[j] = True
        to_picked = torch.minimum(to_picked, distances(j, j + 1)[0])
    return torch.tensor(picks, dtype=torch.long, device=projected.device)


def pick(crop: CropInput) -> Pick:
    projected = crop.project(crop.patches)  # (N, D): every candidate through the projector
    kept = max_min_picks(projected, crop.budget).sort().values
    return pruned(crop, kept, tokens=projected[kept])


register(Method("divprune", "DivPrune", COMPRESS_ONCE, pick=pick, words=MapWords(tokens="diverse patches (max-min distance)"),
                doc="the most diverse projected patches (max-min cosine distance)"))
