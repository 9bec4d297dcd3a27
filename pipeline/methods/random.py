"""Random: the baseline papers measure against. B patch units drawn without replacement, seeded by the
image's content and the crop (`torch.manual_seed(int(digest[:15], 16) + crop)`, then
`torch.randperm(N)[:B]`), so every turn, session and process draws the same units. A generator of its
own with that seed gives torch's global-seed draw without touching the global state."""

import torch

from .base import CropInput, Pick, pruned
from .registry import COMPRESS_ONCE, MapWords, Method, register


def pick(crop: CropInput) -> Pick:
    n = crop.patches.shape[0]
    generator = torch.Generator().manual_seed(crop.seed)
    kept = torch.randperm(n, generator=generator)[: min(crop.budget, n)].to(crop.units.device)
    return pruned(crop, kept)


register(Method("random", "Random", COMPRESS_ONCE, pick=pick, words=MapWords(tokens="random patches (seeded by the image)"),
                doc="patches drawn at random, seeded by the image (the control)"))
