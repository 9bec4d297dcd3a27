"""The attention FastV and SGL read inside the language model, without eager attention anywhere.

`ImportanceCapture` puts per-instance hooks on a model's attention layers (removed on exit; nothing
global is patched): each hooked layer's queries (`q_proj` output) and rotary (cos, sin) are saved, and
after the layer ran, its post-rotary keys are in the KV cache, so only the needed rows
softmax(q K^T / sqrt(d)) are computed. `Guidance` is what decided one turn's pruning, for the UI.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Guidance:
    """What decided the pruning of one turn (plain numpy, for the UI): SGL's small model, or FastV's
    own attention in layer K - 1 (then the SGL-only fields keep their defaults)."""
    importance: np.ndarray  # (V,) per visual token of the conversation, in order
    kept: np.ndarray  # sorted indices into the V visual tokens that the large model keeps from layer K on
    confidence: float = 0.0
    consistency: float = 0.0
    score: float = 0.0
    threshold: float | None = None
    early_exit: bool = False
    small_answer: str = ""
    small_tokens: list = field(default_factory=list)  # the small model's answer ids
    prune_layer: int = 0  # K
    rows: int = 0  # query rows whose attention was summed (per layer)
    image_spans: dict = field(default_factory=dict)  # image key -> (start, end) in the V visual tokens
    source: str = "sgl"  # "sgl" or "fastv"



class ImportanceCapture:
    """Hooks on one model instance's attention layers, removed on exit; nothing global is patched.

    While active, every forward on top of `cache` adds, for each query row whose position in the
    cache is > `after` (the last visual token), the softmax attention it pays to `visual` (indices
    into the cache), summed over heads and layers, to `self.importance`."""

    def __init__(self, vlm, cache, visual: torch.Tensor, after: int, layers: list | None = None):
        self.layers = vlm.language_model.layers
        self.hooked = list(range(len(self.layers))) if layers is None else list(layers)  # FastV: one layer
        self.family = vlm.family
        self.cache = cache
        self.visual = visual
        self.after = after
        self.importance = torch.zeros(visual.numel(), dtype=torch.float32, device=visual.device)
        self.rows = 0  # query rows counted in the first hooked layer (a check for the tests)
        self._q, self._rope, self._hooks = {}, {}, []

    def __enter__(self):
        self._rotary = self.family.rotary(self.layers[0].self_attn)  # as the layer itself rotates its queries
        for i in self.hooked:
            attn = self.layers[i].self_attn
            self._hooks.append(attn.register_forward_pre_hook(self._save_rope(i), with_kwargs=True))
            self._hooks.append(attn.q_proj.register_forward_hook(self._save_q(i)))
            self._hooks.append(attn.register_forward_hook(self._accumulate(i)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _save_rope(self, i):
        def hook(module, args, kwargs):
            self._rope[i] = kwargs["position_embeddings"]
        return hook

    def _save_q(self, i):
        def hook(module, args, output):
            self._q[i] = output
        return hook

    def _accumulate(self, i):
        def hook(module, args, output):
            keys = self.cache.layers[i].keys  # (1, Hkv, L, d) post-rotary, this forward's tokens included
            L = keys.shape[2]
            q = self._q.pop(i)  # (1, n, H*d)
            n = q.shape[1]
            first = max(0, self.after + 1 - (L - n))  # rows of this forward that come after the last visual token
            if first >= n:
                return
            q = q.view(1, n, -1, module.head_dim).transpose(1, 2)  # (1, H, n, d)
            cos, sin = self._rope.pop(i)
            q = self._rotary(q, q, cos, sin)[0][:, :, first:]  # (1, H, r, d)
            heads = q.shape[1]
            k = keys.repeat_interleave(heads // keys.shape[1], dim=1)  # (1, H, L, d)
            logits = (q.float() @ k.float().transpose(-1, -2)) * module.scaling  # (1, H, r, L)
            rows = torch.arange(L - n + first, L, device=q.device)[:, None]
            logits.masked_fill_(torch.arange(L, device=q.device)[None, :] > rows, float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # (1, H, r, L)
            self.importance += probs.sum(dim=(0, 1, 2))[self.visual]
            if i == self.hooked[0]:
                self.rows += probs.shape[2]
        return hook
