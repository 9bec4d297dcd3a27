"""zipchat's own decoder as an engine: one model, its KV caches per conversation (a KVStore that the app's
sessions share), a prefill on top of the longest cached prefix, then one token at a time.

A request with `prune` runs pruned inside the model (FastV, SGL): layers < K on every token, then only the
kept ones with their original positions (`generate.forward_layers`), on an emptied cache. A request with
`watch` has hooks on the model while it runs (the attention FastV and SGL read)."""

import contextlib
import time

import torch

from ..generate import embed, embed_tokens, forward_layers, pick, suppress
from ..kvstore import cache_nbytes
from ..lane import Lane
from .base import Usage


class TransformersEngine:
    name = "transformers"
    concurrent = False

    def __init__(self, vlm, kv, lane: str = "large"):
        self.vlm, self.kv = vlm, kv
        self.lane = lane  # the cache's name in the store: "large", or "small" (SGL's small model)

    def max_model_len(self):
        return None

    def stream(self, request, usage: Usage | None = None):
        """The answer's token ids (engines/base.py). The conversation's cache is checked out of the store while
        the answer runs, and back in when it ends, however it ends."""
        usage = usage if usage is not None else Usage()
        cache, signature = self.kv.checkout(request.conversation, self.lane)
        lane = Lane(self.vlm, cache, signature)
        try:
            if request.prune is None:
                start, features, reused = lane.reuse(request.slots, enabled=request.reuse)
            else:
                lane.reset()  # what a pruned pass keeps depends on the question: nothing is reused
                start = 0
            usage.prompt_tokens, usage.cached_tokens, usage.pruned = len(request.ids), start, request.prune is not None
            with request.watch(lane.cache) if request.watch is not None else contextlib.nullcontext():
                p0 = time.perf_counter()
                if request.prune is None:
                    logits, feed = lane.prefill(request.ids, request.slots, start, features), lane.feed
                else:
                    logits, feed = self._pruned_prefill(lane, request)
                usage.prefill_s = time.perf_counter() - p0
                if request.forced is not None:
                    yield from self._forced(request, logits, feed, usage)
                else:
                    yield from self._picks(request, logits, lambda token: feed([token])[-1], usage)
        finally:
            if lane.cache is not None:
                usage.kv_cache_bytes = cache_nbytes(lane.cache)
                self.kv.checkin(request.conversation, self.lane, lane.cache, lane.signature)

    def _picks(self, request, logits, step, usage):
        rng = torch.Generator().manual_seed(request.seed)
        for n in range(request.max_tokens):
            logits = suppress(logits, self.vlm)  # never an image placeholder or a chat marker
            token = pick(logits, request.sampling, rng)
            if request.max_probs is not None:
                request.max_probs.append(float(torch.softmax(logits, -1).max()))
            usage.completion_tokens = n + 1
            yield token
            if n + 1 < request.max_tokens:
                logits = step(token)

    def _forced(self, request, logits, feed, usage):
        """Teacher forcing: the log-probability of each of `request.forced` (under the distribution picks come
        from: `suppress`ed logits), the answer fed in one forward after the prompt's last position."""
        forced = list(request.forced)
        if forced:
            after = feed(forced[:-1]) if len(forced) > 1 else logits.new_zeros((0, logits.shape[-1]))
            rows = suppress(torch.cat([logits[None], after]), self.vlm)  # (n, V): row i predicts forced[i]
            ids = torch.tensor(forced, device=rows.device)
            picked = torch.log_softmax(rows, -1)[torch.arange(len(forced)), ids]
            if request.logprobs is not None:
                request.logprobs.extend(picked.tolist())
            if request.greedy is not None:
                request.greedy.extend((rows.argmax(-1) == ids).tolist())
        for n, token in enumerate(forced):
            usage.completion_tokens = n + 1
            yield token

    def _pruned_prefill(self, lane, request) -> tuple:
        """The prompt pruned at layer K -> (logits of its last position, feed(tokens) -> logits after each)."""
        vlm, (k_layer, keep) = self.vlm, request.prune
        positions = vlm.family.positions(request.ids, request.slots)  # (P, L): the kept tokens keep theirs

        def mask(h, cache):
            return (keep(h, cache) if callable(keep) else keep).to(vlm.device)
        embeds = embed(vlm, request.ids, request.features)
        logits = forward_layers(vlm, embeds, positions, lane.cache, prune_at=k_layer, keep=mask)[-1]
        first, fed = int(positions.max()) + 1, [0]

        def feed(tokens):
            n = len(tokens)
            position = first + fed[0] + torch.arange(n)[None].expand(vlm.family.position_rows, n)
            fed[0] += n
            return forward_layers(vlm, embed_tokens(vlm, tokens), position, lane.cache, last=n)
        return logits, feed
