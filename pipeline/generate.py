"""The language-model side: embed token ids with image features, prefill on a KV cache, decode.

We call the decoder (`model.model.language_model`) and `lm_head` directly instead of
`generate()`: the session owns the cache across turns, feeds only new tokens, and stops when asked.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0


def new_cache(vlm) -> DynamicCache:
    return DynamicCache(config=vlm.language_model.config)


def embed(vlm, ids: list, features: list) -> torch.Tensor:
    """ids (L,) with image_token_id placeholders, features: tensors (n_i, D) in order -> (1, L, D)."""
    ids_t = torch.tensor([ids], device=vlm.device)
    embeds = vlm.model.get_input_embeddings()(ids_t)  # (1, L, D)
    if features:
        mask = ids_t[0] == vlm.image_token_id
        image = torch.cat(features).to(embeds.dtype)
        if int(mask.sum()) != image.shape[0]:
            raise RuntimeError(f"{int(mask.sum())} image placeholders but {image.shape[0]} image features")
        embeds[0, mask] = image
    return embeds


@torch.inference_mode()
def forward(vlm, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run new positions (1, n, D) on top of `cache` (extended in place) -> logits of the last (V,)."""
    start = cache.get_seq_length()
    positions = torch.arange(start, start + embeds.shape[1], device=embeds.device).unsqueeze(0)
    out = vlm.language_model(inputs_embeds=embeds, past_key_values=cache, position_ids=positions, use_cache=True)
    return vlm.model.lm_head(out.last_hidden_state[:, -1]).float()[0]


def embed_token(vlm, token_id: int) -> torch.Tensor:
    return vlm.model.get_input_embeddings()(torch.tensor([[token_id]], device=vlm.device))


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p.cpu() / sorted_p.sum().cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])
