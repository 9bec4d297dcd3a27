"""One model's pass over a conversation: the model, its KV cache, and what the cache holds.

The signature is one key per slot of the flat sequence (prompt.Slot): ("t", token id) per text token, and
("i", image key, method, budget...) per image, so a later turn can keep the longest prefix the cache still
matches (the same tokens and the same compressed images) and prefill only the rest.
"""

import torch

from .generate import embed, embed_token, embed_tokens, forward, new_cache, truncate_cache


class Lane:
    def __init__(self, vlm, cache=None, signature=None):
        self.vlm = vlm
        self.cache = cache
        self.signature = list(signature or [])
        self.next_position = None  # the position of the next token fed (after a prefill)

    def reset(self):
        """An empty cache (for passes that cannot be reused, like SGL's pruned large model)."""
        self.cache, self.signature = new_cache(self.vlm), []

    def reuse(self, slots: list, enabled: bool = True) -> tuple:
        """Keep the longest prefix of the cache that matches `slots`.
        -> (first position to run, features of the images in the rest, whether anything was reused)."""
        n = 0
        if enabled and self.cache is not None:
            keys = [u.key for u in slots]
            while n < min(len(keys), len(self.signature)) and keys[n] == self.signature[n]:
                n += 1
        n = min(n, len(slots) - 1)  # at least one position to run, for the logits
        start = slots[n].start if n > 0 else 0
        if n == 0:
            self.reset()
        else:
            truncate_cache(self.cache, start)
            self.signature = self.signature[:n]
        return start, [u.features for u in slots[n:] if u.features is not None], n > 0

    def prefill(self, ids: list, slots: list, start: int, features: list) -> torch.Tensor:
        """Run ids[start:] (images filled in from `features`) -> logits of the last position."""
        positions = self.vlm.family.positions(ids, slots)  # (P, L) of the whole sequence
        logits = forward(self.vlm, embed(self.vlm, ids[start:], features), self.cache, positions[:, start:])
        self.signature = [u.key for u in slots]
        self.next_position = int(positions.max()) + 1
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Feed one generated token -> logits of the next."""
        position = torch.full((self.vlm.family.position_rows, 1), self.next_position)
        logits = forward(self.vlm, embed_token(self.vlm, token), self.cache, position)
        self.signature.append(("t", token))
        self.next_position += 1
        return logits

    def feed(self, tokens: list) -> torch.Tensor:
        """Feed several text tokens at once (a forced answer) -> logits after each (n, V)."""
        n = len(tokens)
        position = self.next_position + torch.arange(n)[None].expand(self.vlm.family.position_rows, n)
        logits = forward(self.vlm, embed_tokens(self.vlm, tokens), self.cache, position, last=n)
        self.signature += [("t", t) for t in tokens]
        self.next_position += n
        return logits
