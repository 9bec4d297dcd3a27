"""Pool: the other baseline. The crop's unit grid (rows x cols) is cut into gr x gc cells, boundaries at
floor(i x rows / gr) and floor(j x cols / gc); each token is the mean of its cell's projected units,
cells in row-major order. (gr, gc) follows the grid's aspect ratio: gr is floor or ceil of
sqrt(B x rows / cols), gc = floor(B / gr), both capped by the grid (no empty cell), the pair with more
cells winning (ties: the smaller gr). 24x24 at B = 64: 8x8 cells of 3x3 units. A pooled token stands
at its cell's centre unit (M-RoPE families take that unit's position). No unit is sent as itself:
the map shows each cell as one group. The projector's last layer is affine, so the cells' means of
its hidden layer go through it instead of every unit (`Family.project_parts`): the same tokens."""

import math

import torch

from .base import CropInput, Pick
from .registry import COMPRESS_ONCE, MapWords, Method, register


def cells(rows: int, cols: int, budget: int) -> tuple:
    """(gr, gc) for a rows x cols grid and at most `budget` cells."""
    if rows * cols <= budget:
        return rows, cols
    ideal = math.sqrt(budget * rows / cols)
    options = []
    for gr in sorted({max(1, math.floor(ideal)), max(1, math.ceil(ideal))}):
        gr = min(gr, rows, budget)
        gc = min(cols, max(1, budget // gr))
        options.append((gr * gc, -gr, gr, gc))
    _, _, gr, gc = max(options)
    return gr, gc


def cell_of(rows: int, cols: int, gr: int, gc: int) -> torch.Tensor:
    """(rows*cols,) the cell id of each unit (row-major cells)."""
    r_edges = [i * rows // gr for i in range(gr + 1)]
    c_edges = [j * cols // gc for j in range(gc + 1)]
    r_cell = torch.bucketize(torch.arange(rows), torch.tensor(r_edges[1:]), right=True)
    c_cell = torch.bucketize(torch.arange(cols), torch.tensor(c_edges[1:]), right=True)
    return (r_cell[:, None] * gc + c_cell[None, :]).flatten()


def pick(crop: CropInput) -> Pick:
    rows, cols = crop.grid
    gr, gc = cells(rows, cols, crop.budget)
    device = crop.units.device
    cell = cell_of(rows, cols, gr, gc).to(device)  # (N,)
    n = gr * gc
    counts = torch.bincount(cell, minlength=n).float()[:, None]

    def cell_means(values):  # (N, E) -> (n, E) in float32
        return torch.zeros(n, values.shape[1], device=device).index_add_(0, cell, values.float()) / counts
    if crop.project_parts is not None:  # mean(last(h)) = last(mean(h)) for an affine last layer: project the means
        inner, last = crop.project_parts
        hidden = inner(crop.patches)
        tokens = last(cell_means(hidden).to(hidden.dtype))
    else:
        projected = crop.project(crop.patches)
        tokens = cell_means(projected).to(projected.dtype)
    r_edges = [i * rows // gr for i in range(gr + 1)]
    c_edges = [j * cols // gc for j in range(gc + 1)]
    centres = torch.tensor([((r_edges[i] + r_edges[i + 1] - 1) // 2) * cols + (c_edges[j] + c_edges[j + 1] - 1) // 2
                            for i in range(gr) for j in range(gc)], dtype=torch.long, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Pick(tokens=tokens,
                projected=True, token_patches=centres, token_groups=torch.arange(n, device=device), kept=empty,
                includes_cls=False, groups=cell, targets=empty, scores=None)


register(Method("pool", "Pool", COMPRESS_ONCE, pick=pick, kept_set=False,
                not_in_overlap="Pool keeps no patch as itself (its tokens are cell means)",
                words=MapWords(merged="pooled", tokens="pooled cells (cell means)"),
                doc="the mean of each cell of a grid (the control)"))
