"""CDPruner (Zhang et al., NeurIPS 2025): the visual tokens of greatest conditional diversity for the question.

Rule, per crop, as the authors' code (Theia-4869/CDPruner, llava_arch.py `encode_images`) does it:
1. relevance r (N,): the cosine of each patch's image embedding with the question's text embedding(s), averaged
   over the text rows, negated (LLaVA: CLIP space, where the authors negate it), then min-max normalised over
   the whole image (every crop): r = (r - min + 1e-6) / (max - min);
2. similarity S (N, N): cosines of the projected visual tokens (after the projector, what the LLM receives);
3. kernel L = diag(r) S diag(r);
4. greedy MAP inference of the DPP with kernel L for the budget B = dominant + contextual (fast greedy, Chen et
   al. 2018: an incremental Cholesky; each step takes the unit of largest remaining gain, ties to the lowest
   index); the kept units are sent in index order, each as its projected token.
The relevance's image-text space: LLaVA-1.5 and LLaVA-NeXT use CLIP ViT-L/14-336's text tower and visual
projection (text_tower.py), as the authors do. The other families' towers give no per-token image-text space
(SigLIP reaches it through an attention-pooling head; InternViT and Qwen2.5-VL's tower have no text tower), and
the authors' public code covers LLaVA only: there zipchat measures the projected tokens against the language
model's input embeddings of the question's tokens (not negated). Before a question (a map drawn as an image
arrives), r = 1: the DPP of the tokens' diversity alone. Departure: where the kernel's rank is spent (a gain
<= 1e-6 of the largest diagonal entry; the authors' loop would divide by ~0), the rest of the budget goes to
the most relevant units not yet kept.
"""

import torch
import torch.nn.functional as F

from .base import CropInput, Pick, cosine_matrix, pruned, ranked
from .registry import QUESTION, MapWords, Method, register

RANK_SPENT = 1e-6  # a greedy gain at or below this share of the kernel's largest diagonal entry adds nothing


@torch.inference_mode()
def relevance(vlm, out, question: str) -> list:
    """Each patch's relevance to `question`, normalised over the image -> [(N,) float32 per crop]."""
    family = vlm.family
    patches = out.units[:, 1:] if family.has_cls else out.units  # (B, N, C)
    crops, n = patches.shape[:2]
    raw = None
    if question.strip() and family.clip_text_source is not None:
        raw = -clip_cosines(vlm, patches, question)  # (B, N)
    elif question.strip():
        raw = embedding_cosines(vlm, patches, question)
    if raw is None or not raw.max() > raw.min():  # no question yet (or nothing to tell the patches apart)
        return [torch.ones(n) for _ in range(crops)]
    raw = raw.float().cpu()
    normalised = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
    return list(normalised)


def clip_cosines(vlm, patches: torch.Tensor, question: str) -> torch.Tensor:
    """(B, N, C) -> (B, N): cosine of CLIP's image embedding of each patch with the question's text embeddings,
    averaged over the text's 77-token rows."""
    from ..families.llava_common import tower_body
    from ..text_tower import clip_text
    tower = clip_text(vlm)
    text = F.normalize(tower.text_embeds(question), dim=-1)  # (S, E)
    post_layernorm = tower_body(vlm.family.tower(vlm.model)).post_layernorm
    image = F.normalize(tower.image_embeds(post_layernorm, patches), dim=-1)  # (B, N, E)
    return (image @ text.T).mean(dim=-1)


def embedding_cosines(vlm, patches: torch.Tensor, question: str) -> torch.Tensor | None:
    """(B, N, C) -> (B, N): cosine of each projected visual token with the language model's input embedding of
    each of the question's tokens (text only: never control tokens), averaged over them. None: no token."""
    ids = vlm.tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if not ids:
        return None
    words = vlm.model.get_input_embeddings()(torch.tensor(ids, device=vlm.device))  # (M, D)
    tokens = vlm.family.project(vlm.model, patches)  # (B, N, D)
    return (F.normalize(tokens.float(), dim=-1) @ F.normalize(words.float(), dim=-1).T).mean(dim=-1)


def greedy_map(kernel: torch.Tensor, budget: int, relevance: torch.Tensor) -> torch.Tensor:
    """Fast greedy MAP of the DPP with `kernel` (N, N) for `budget` items -> their indices, in pick order."""
    n = kernel.shape[0]
    cis = torch.zeros(budget, n, dtype=kernel.dtype)  # rows of the incremental Cholesky factor
    gains = torch.diagonal(kernel).clone()  # (N,) each unit's remaining gain
    floor = RANK_SPENT * float(gains.max())
    chosen = []
    for i in range(budget):
        j = int(torch.argmax(gains))  # (the first largest: ties to the lowest index)
        if not float(gains[j]) > floor:  # the kernel's rank is spent: the most relevant of the rest
            rest = [int(u) for u in ranked(relevance) if int(u) not in set(chosen)]
            return torch.tensor(chosen + rest[:budget - len(chosen)], dtype=torch.long)
        chosen.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(gains[j])
        cis[i] = e
        gains -= e * e
        gains[j] = -float("inf")
    return torch.tensor(chosen, dtype=torch.long)


def pick(crop: CropInput) -> Pick:
    tokens = crop.project(crop.patches)  # (N, D): the LLM's tokens; their similarity is measured here
    r = crop.relevance.float().cpu()  # (N,)
    kernel = r[:, None] * cosine_matrix(tokens).cpu() * r[None, :]  # (N, N) float32
    kept = greedy_map(kernel, crop.budget, r).sort().values
    return pruned(crop, kept.to(tokens.device), tokens=tokens[kept.to(tokens.device)], scores=r)


def caption(comp) -> str:
    share = 100 * comp.num_tokens / comp.full_tokens
    asked = f"for “{shorten(comp.question)}”" if comp.question.strip() else "before a question (diversity alone)"
    crops = f" in {len(comp.crops)} {comp.crop_word}" if len(comp.crops) > 1 else ""
    return (f"CDPruner {asked}: {comp.num_tokens} diverse relevant patches{crops} = {comp.num_tokens} of "
            f"{comp.full_tokens} visual tokens ({share:.0f}%); selected again for every question")


def shorten(text: str, most: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= most else text[:most - 1] + "…"


def stats_rows(t) -> list:
    n = t.images_encoded
    return [("selection", f"for this question: {n} image{'s' * (n != 1)} selected for it (each question selects "
                          "again)")]


register(Method("cdpruner", "CDPruner", QUESTION, pick=pick, relevance=relevance, caption=caption,
                stats_rows=stats_rows,
                words=MapWords(tokens="diverse relevant patches (DPP)"),
                doc="the question's relevance times token similarity, a DPP's greedy MAP per crop: selected again "
                    "for every question"))
