"""A bound on what all conversations of one process keep: their images and compressed features.

Each conversation's images are already kept no larger than its model can use (Family.compact_size), but a
server with many visitors still needs a ceiling. Past `max_bytes`, the images and features of the
least recently used conversations that are not answering are dropped; such a conversation's next
message says so and starts over (ChatSession.check_images). The app registers the state objects it
holds (in its main process, also on ZeroGPU) whenever an event touches them.
"""

import threading
from collections import OrderedDict

from .stopflag import AnsweringFlag


def state_nbytes(state) -> int:
    """Bytes a ChatState keeps in images (uint8 RGB arrays) and compressed features."""
    images = sum(pixels.nbytes for pixels in state.images.values())
    return images + sum(c.nbytes for c in state.compressions.values())


def drop_images(state):
    """Forget a conversation's images and features to free memory; its next message will say so."""
    state.images.clear()
    state.clips.clear()
    state.compressions.clear()
    state.pending, state.picks, state.last_image_key = [], {}, None
    state.images_dropped = True


class MemoryBudget:
    def __init__(self, max_bytes: int = 1 << 30, fixed=None):
        self.max_bytes = max_bytes
        self.fixed = fixed  # () -> bytes kept outside any conversation that count too (the example cache)
        self._states = OrderedDict()  # session id -> ChatState, least recently used first
        self._lock = threading.Lock()

    def touch(self, state) -> int:
        """Register `state` as just used, then drop the images of other conversations that are not
        answering (AnsweringFlag) while over the budget. -> the bytes all conversations keep afterwards."""
        sid = state.session_id
        with self._lock:
            self._states[sid] = state
            self._states.move_to_end(sid)
            sizes = {k: state_nbytes(s) for k, s in self._states.items()}
            total = sum(sizes.values()) + (self.fixed() if self.fixed else 0)
            for k, s in list(self._states.items()):
                if total <= self.max_bytes:
                    break
                if k == sid or not sizes[k] or AnsweringFlag(k).is_set():
                    continue
                drop_images(s)
                total -= sizes[k]
            return total

    def forget(self, session_id: str):
        with self._lock:
            self._states.pop(session_id, None)

    def __len__(self):
        return len(self._states)
