"""The engine interface: what runs the language model for a turn, knowing only token ids.

An engine has
  - `name`: "transformers" (zipchat's own decoder) or "vllm" (a vLLM server fed prompt embeddings);
  - `concurrent`: whether it answers several requests at once (vLLM batches them; zipchat's decoder
    answers one at a time);
  - `max_model_len()`: the positions it holds per request (prompt + answer), or None for the model's own;
  - `stream(request, usage)`: a generator of the answer's token ids, at most `request.max_tokens` of them.
    Closing it ends the answer (a vLLM request is aborted on the server); `usage` is filled in as the engine
    learns it (vLLM: when the stream ends).
The one decode loop (turn.py) turns the ids into text and the turn's stats, for every engine alike.
"""

from dataclasses import dataclass

from ..config import Sampling


@dataclass
class Request:
    """One answer to generate, in an engine's terms: the prompt (token ids, and what each stretch of them
    holds: a text token or one image's compressed features) and how to pick the answer's tokens."""
    ids: list  # the prompt's token ids, each image's visual tokens as placeholder ids
    slots: list  # list[prompt.Slot], in order: what ids[start:end] hold
    max_tokens: int
    sampling: Sampling
    seed: int  # sampling's seed for this answer
    stop_ids: list  # the answer ends before any of these (the decode loop stops at them)
    conversation: str = ""  # the session id: zipchat's decoder keeps a KV cache per conversation
    reuse: bool = True  # zipchat's decoder: keep the longest cached prefix (False: prefill everything)
    ignore_stops: bool = False  # always max_tokens (benchmarks on random weights)
    # zipchat's decoder only (the in-LLM methods; vLLM refuses them):
    prune: tuple | None = None  # (layer K, keep): from layer K on only the tokens where keep (len(ids),) is True
    # (or keep(hidden states entering layer K, cache) -> that mask, called once the layers below ran); the cache
    # is rebuilt for it
    watch: object = None  # (KV cache) -> a context manager around the prefill and decode (attention capture)
    max_probs: list | None = None  # filled with the largest probability at each picked token (SGL's confidence)
    forced: list | None = None  # a given answer (ids) instead of picking: teacher forcing, for its log-likelihood
    logprobs: list | None = None  # with `forced`: filled with each forced token's log-probability
    greedy: list | None = None  # with `forced`: filled with whether each forced token is the most likely one

    @property
    def features(self) -> list:
        """The images' compressed features, in order: (visual tokens, D) each."""
        return [s.features for s in self.slots if s.features is not None]


@dataclass
class Usage:
    """What an engine reports about one request."""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache (zipchat's KV store, vLLM's prefix cache)
    completion_tokens: int = 0
    finish_reason: str | None = None
    prefill_s: float = 0.0  # zipchat's decoder: the prefill's seconds (vLLM's are inside the time to first token)
    kv_cache_bytes: int = 0  # zipchat's decoder: its KV cache after the answer
    pruned: bool = False  # the prefill pruned inside the model (every token computed, none reused)
