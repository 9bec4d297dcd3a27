"""The plain data of one conversation: what a browser tab keeps between events.

Everything here pickles (no model, no device tensor): on ZeroGPU every GPU call runs in a worker
process (forked from the app, reused while idle), receives this state through a queue (CPU tensors
shared, the rest copied) and hands back the updated state. Models are looked up by name; the KV cache
lives beside the state in a process-local store (kvstore.py) and is rebuilt with one prefill where it
is not there (a new worker).
"""

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from .config import Settings


@dataclass
class Turn:
    """One question and its answer. The answer is kept as text: the next turn renders the whole
    conversation again with the checkpoint's chat template."""
    question: str
    images: list = field(default_factory=list)  # keys of the images sent with this question
    answer: str = ""
    answer_tokens: int = 0
    stopped: bool = False


@dataclass
class ChatState:
    model: str  # name of the large (answering) model
    small: str | None = None  # name of the SGL small model
    settings: Settings = field(default_factory=Settings)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    turns: list = field(default_factory=list)  # list[Turn]
    window_start: int = 0  # turns before this index no longer fit the model's context window
    pending: list = field(default_factory=list)  # image keys waiting for the next question
    images: dict = field(default_factory=dict)  # image key -> uint8 (H, W, 3) pixels, no larger than the model uses
    # (Family.compact_size); a clip's: uint8 (F, h, w, 3) frames at the family's video size (video.Frames)
    clips: dict = field(default_factory=dict)  # a clip's key -> {"times", "indices", "shown", "sampled_fps", "crops"}
    compressions: OrderedDict = field(default_factory=OrderedDict)  # (key, method, model) -> Compression
    cache_bytes: int = 1 << 30  # bound of `compressions` (LRU by bytes)
    picks: dict = field(default_factory=dict)  # image key -> {crop: [units]} the "manual" method sends
    last_image_key: str | None = None
    question: str = ""  # the question being answered, or the last one: what a question-conditioned method (CDPruner)
    # selects every image for
    last_turn: object = None  # TurnStats of the latest turn
    images_dropped: bool = False  # the images were dropped to free memory (memory.py): the next message says so
