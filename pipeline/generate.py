"""The language-model side: embed token ids with image features, prefill on a KV cache, decode.

We call the decoder (`model.model.language_model`) and `lm_head` directly instead of
`generate()`: the session owns the cache across turns, feeds only new tokens, and stops when asked.
"""

import functools
import inspect

import torch
from transformers import DynamicCache

from .config import MIN_TEMPERATURE, Sampling


def new_cache(vlm) -> DynamicCache:
    return DynamicCache(config=vlm.language_model.config)


def embed(vlm, ids: list, features: list) -> torch.Tensor:
    """ids (L,) with image_token_id placeholders, features: tensors (n_i, D) in order -> (1, L, D)."""
    ids_t = torch.tensor([ids], device=vlm.device)
    embeds = vlm.model.get_input_embeddings()(ids_t)  # (1, L, D)
    if features:
        # placeholder positions from the Python list: no device sync, no data-dependent shapes
        where = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
        image = torch.cat(features).to(embeds.device, embeds.dtype)  # the state keeps features on the CPU
        if len(where) != image.shape[0]:
            raise RuntimeError(f"{len(where)} image placeholders but {image.shape[0]} image features")
        embeds[0, torch.tensor(where, device=embeds.device)] = image
    return embeds


@torch.inference_mode()
def forward(vlm, embeds: torch.Tensor, cache: DynamicCache, positions: torch.Tensor | None = None,
            last: int | None = None) -> torch.Tensor:
    """Run new tokens (1, n, D) on top of `cache` (extended in place) -> logits of the last (V,), or of the
    last `last` positions (last, V). `positions` (P, n): the family's position ids of these tokens (default:
    the next n indices)."""
    if positions is None:
        start = cache.get_seq_length()
        positions = torch.arange(start, start + embeds.shape[1])[None]
    position_ids = vlm.family.position_ids(positions.to(embeds.device))
    lm = vlm.language_model
    out = lm(inputs_embeds=embeds, position_ids=position_ids, use_cache=True, **{cache_argument(lm): cache})
    if last is None:
        return vlm.model.lm_head(out.last_hidden_state[:, -1]).float()[0]
    return vlm.model.lm_head(out.last_hidden_state[:, -last:]).float()[0]


def embed_token(vlm, token_id: int) -> torch.Tensor:
    return vlm.model.get_input_embeddings()(torch.tensor([[token_id]], device=vlm.device))


def embed_tokens(vlm, token_ids: list) -> torch.Tensor:
    """Text token ids (n,) -> (1, n, D)."""
    return vlm.model.get_input_embeddings()(torch.tensor([token_ids], device=vlm.device))


def suppress(logits: torch.Tensor, vlm) -> torch.Tensor:
    """-inf on the ids generation must never emit: image placeholders and other control tokens
    that are not stop tokens, and embedding rows the tokenizer has no token for."""
    bias = vlm.extra.get("suppress_bias")
    if bias is None or bias.device != logits.device:
        bias = torch.zeros(logits.shape[-1], device=logits.device)
        banned = [i for i in vlm.banned_ids if i < logits.shape[-1]]
        bias[banned] = float("-inf")
        vlm.extra["suppress_bias"] = bias
    return logits + bias


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p.cpu() / sorted_p.sum().cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


def cache_argument(module) -> str:
    """The name `module.forward` takes the KV cache under: `cache` from transformers 5.24 on (which
    still accepts `past_key_values`, with a deprecation warning), `past_key_values` before (5.17)."""
    return _cache_argument(type(module))


@functools.lru_cache(maxsize=None)
def _cache_argument(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def truncate_cache(cache: DynamicCache, length: int):
    """Keep the first `length` positions of every layer (written against the layer tensors, which
    are stable across transformers 5.x, rather than `crop`, whose meaning changed)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def causal_mask(n_new: int, n_past: int, device) -> torch.Tensor | None:
    """(1, 1, n_new, n_past + n_new) boolean mask, True = may attend. None for a single new token."""
    if n_new == 1:
        return None
    q = torch.arange(n_new, device=device)[:, None] + n_past
    k = torch.arange(n_past + n_new, device=device)[None, :]
    return (k <= q)[None, None]


@torch.inference_mode()
def forward_layers(vlm, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                   prune_at: int | None = None, keep: torch.Tensor | None = None, last: int = 1) -> torch.Tensor:
    """The decoder written out layer by layer, so that tokens can be dropped part-way (SGL).

    embeds (1, n, D) at `positions` (P, n) (the family's position ids) are run on top of `cache`. At
    layer `prune_at` only the tokens where `keep` (n,) is True go on (`keep` may be a function of the hidden
    states entering layer K and the cache giving that mask, called once the layers below ran: FastV reads
    layer K - 1's attention, DART its keys and those hidden states), with their original positions
    (for the rotary embedding); layers from there on cache only those tokens. Each layer's cache may
    therefore have its own length; a token attends to every earlier token in its layer's cache.
    Returns the logits (last, V) of the final `last` surviving positions."""
    lm = vlm.language_model
    h, pos = embeds, positions.to(embeds.device)
    rope = lm.rotary_emb(h, vlm.family.position_ids(pos))
    for i, layer in enumerate(lm.layers):
        if i == prune_at and keep is not None:
            mask = keep(h, cache) if callable(keep) else keep
            h, pos = h[:, mask], pos[:, mask]
            rope = lm.rotary_emb(h, vlm.family.position_ids(pos))
        n_past = cache.layers[i].get_seq_length() if i < len(cache.layers) else 0
        h = layer(h, attention_mask=causal_mask(h.shape[1], n_past, h.device), use_cache=True,
                  position_embeddings=rope, **{cache_argument(layer): cache})
        if isinstance(h, tuple):
            h = h[0]
    h = lm.norm(h[:, -last:])
    return vlm.model.lm_head(h).float()[0]
