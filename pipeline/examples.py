"""The example gallery, compressed ahead: most visitors of a demo click an example first.

`ExampleCache` holds, for one process, the Compressions of the example images for the settings the app
starts with; a ChatSession given the cache takes an example's compression from it instead of encoding
(the same Compression `encode_image` makes). `warm` fills it one image at a time, at low priority: it
waits while any conversation is answering (AnsweringFlag, seen across processes), and encodes under the
model's encode lock (VLM.encode_lock, which a turn's encode also takes), so a person's request waits at
most for the one example being encoded, never for the gallery. Only the examples are kept here, and
their bytes count in the app's memory budget (memory.py).
"""

import threading
import time

from .compress import encode_image, method_key
from .methods import registry
from .images import image_digest, load_image
from .stopflag import answering_now


class ExampleCache:
    def __init__(self):
        self._entries = {}  # (model name, image key, method key) -> Compression
        self._lock = threading.Lock()

    def get(self, model: str, image_key: str, key: tuple):
        with self._lock:
            return self._entries.get((model, image_key, key))

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._entries.values())

    def __len__(self):
        return len(self._entries)

    def warm(self, vlm, paths, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
             max_tiles: int = 0, stop: threading.Event | None = None, polite: bool = True):
        """Compress each example image (as ChatSession.add_image would keep it) for these settings, one at
        a time under the model's encode lock; `polite`: first wait while any conversation is answering (a
        background thread; not inside a GPU call that queued questions wait for). `stop` ends it between
        images."""
        record = registry.get(method)
        if isinstance(record.images, str):  # an in-LLM method on fixed tokens (FastV prunes Full's per question)
            method = record.images
        elif record.kind not in (registry.FULL, registry.COMPRESS_ONCE):  # SGL's tokens are a setting, Manual's
            method = "visionzip"  # depend on the picks: VisionZip's, the app's default, are the likeliest asked for
        for path in paths:
            while polite and answering_now() and not (stop is not None and stop.is_set()):
                time.sleep(0.2)  # a person first
            if stop is not None and stop.is_set():
                return
            image = load_image(path, fit=vlm.family.compact_size)
            key = (vlm.name, image_digest(image), method_key(method, dominant, contextual, max_tiles))
            if key in self._entries:
                continue
            with vlm.encode_lock:
                comp = encode_image(vlm, image, method, dominant, contextual, max_tiles=max_tiles)
            comp.features = comp.features.cpu()
            with self._lock:
                self._entries[key] = comp
