"""Process-local KV caches, keyed by (session id, lane): a speed-up, never the conversation itself.

A turn checks a lane's cache out (so two turns of one session never share a cache object) and
checks it back in when it ends. The signature stored with each cache says what its positions
hold, so a stale or missing cache only costs a longer prefill, never a wrong answer. On ZeroGPU
a turn runs in a worker process: a worker the `spaces` package reuses finds its cache here; a new one
finds nothing and rebuilds the cache with one prefill.
"""

import threading
from collections import OrderedDict

import torch


def default_budget(device) -> int:
    """Bytes of KV cache to keep across sessions: a quarter of the GPU's memory, 2 GiB on a CPU."""
    if torch.device(device).type == "cuda":
        try:
            return torch.cuda.get_device_properties(device).total_memory // 4
        except (RuntimeError, AssertionError):  # ZeroGPU's main process sees no GPU: its workers hold no cache
            return 4 << 30
    return 2 << 30


class KVStore:
    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._entries = OrderedDict()  # (session id, lane) -> (cache, signature, nbytes)
        self._lock = threading.Lock()

    def checkout(self, session_id: str, lane: str):
        """-> (cache, signature) and forget it here, or (None, [])."""
        with self._lock:
            cache, signature, _ = self._entries.pop((session_id, lane), (None, [], 0))
        return cache, signature

    def signature(self, session_id: str, lane: str) -> list:
        """What the stored cache of this lane holds (a copy; [] when there is none)."""
        with self._lock:
            return list(self._entries.get((session_id, lane), (None, [], 0))[1])

    def checkin(self, session_id: str, lane: str, cache, signature: list):
        with self._lock:
            self._entries[(session_id, lane)] = (cache, signature, cache_nbytes(cache))
            while sum(e[2] for e in self._entries.values()) > self.max_bytes and len(self._entries) > 1:
                self._entries.popitem(last=False)  # least recently used first

    def drop(self, session_id: str):
        with self._lock:
            for key in [k for k in self._entries if k[0] == session_id]:
                del self._entries[key]

    def __len__(self):
        return len(self._entries)


def cache_nbytes(cache) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
