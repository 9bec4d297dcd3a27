"""A conversation's images and their compressions, kept in its state (state.py): each image is kept once,
no larger than the model can use, and compressed once per method and budget (or taken from the example
cache, compressed when the app started), under the model's encode lock, the compressions LRU-bounded by
bytes. No turn logic here: the session asks for what a turn needs."""

import time

import numpy as np
from PIL import Image

from .compress import Compression, encode_image, method_key, selection_digest
from .errors import InputError
from .images import image_digest, load_image
from .video import Frames, is_clip_file, read_clip
from .methods import registry

IMAGES_DROPPED = ("This conversation was idle while the server needed memory for others, so its images were "
                  "dropped and it starts over. Please upload the image again.")


class Images:
    def __init__(self, vlm, small=None, examples=None, clip_frames: int | None = None):
        self.vlm, self.small = vlm, small
        self.clip_frames = clip_frames  # the frames a clip is sampled at (None: 8 on a CPU, the checkpoint's on a GPU)
        self.examples = examples  # an ExampleCache (examples.py): the app's example images, compressed ahead
        self.encoded = [0, 0.0, 0]  # since the last turn: images encoded, the seconds it took, examples taken
        self.ahead_s = 0.0  # seconds spent encoding the next turn's images before it started (prepare_turn)

    @staticmethod
    def check_kept(state):
        """A conversation whose images were dropped to free memory (memory.py) starts over: InputError."""
        if state.images_dropped:  # in place: whoever holds this state (the app's tab) sees it start over
            state.turns, state.window_start, state.last_turn, state.images_dropped = [], 0, None, False
            raise InputError(IMAGES_DROPPED)

    def take_counts(self) -> tuple:
        """(images encoded, seconds, taken from the examples) since the last call."""
        counts, self.encoded = tuple(self.encoded), [0, 0.0, 0]
        return counts

    # ---- keeping ------------------------------------------------------------------------------
    def keep(self, state, image) -> str:
        """Check an image and keep its pixels (uint8 (H, W, 3): 3 bytes a pixel), no larger than the model can
        use (the same tiles and crops: Family.compact_size) -> its key. A video file is kept as a clip (`keep_clip`),
        an animated GIF or WebP too where the model takes video (elsewhere: its first frame, as an image)."""
        if is_clip_file(image, animations=self.vlm.family.takes_video):
            return self.keep_clip(state, image, None)
        image = load_image(image, fit=self.vlm.family.compact_size)
        key = image_digest(image)
        state.images[key] = np.asarray(image)
        return key

    def keep_clip(self, state, source, num_frames: int | None) -> str:
        """Check a clip (a path: video.py), sample `num_frames` frames as transformers' processors do (None:
        `clip_frames`, else 8 on a CPU and the checkpoint's number on a GPU, Qwen2.5-VL's 2 a second), and keep them
        at the size the family's video processor gives them -> its key. InputError for a family without video."""
        family = self.vlm.family
        num_frames = self.clip_frames if num_frames is None else num_frames
        if not family.takes_video:
            raise InputError(f"{type(family).__name__} checkpoints take images, not video "
                             "(LLaVA-OneVision, Qwen2.5-VL and InternVL3 do).")
        clip = read_clip(source, *family.video_sample(num_frames, self.vlm.device.type == "cuda"))
        frames = Frames.of(clip, family.video_frame_size(clip.size))
        key = image_digest(frames)
        state.images[key] = frames.pixels
        state.clips[key] = {"times": list(clip.times), "indices": list(clip.indices), "shown": frames.shown,
                            "sampled_fps": frames.sampled_fps,
                            "crops": -(-len(clip.times) // family.frames_per_crop)}  # (what the map's picker counts)
        return key

    def keep_all(self, state, images, names=None) -> list:
        """`keep` for several images, all or none: when one is refused, none is kept, and the InputError says
        why for each refused one (`names`: what to call them). -> keys."""
        images = list(images)
        before, keys, refused = set(state.images), [], []
        for i, image in enumerate(images):
            try:
                keys.append(self.keep(state, image))
            except InputError as e:
                name = names[i] if names else f"image {i + 1}"
                refused.append(str(e) if name in str(e) or len(images) == 1 else f"{name}: {e}")
        if refused:
            for key in set(state.images) - before:
                del state.images[key]
                state.clips.pop(key, None)
            raise InputError(" ".join(refused))
        return keys

    @staticmethod
    def image(state, key: str):
        """The kept image `key` as a PIL image (a clip: video.Frames)."""
        if key in state.clips:
            clip = state.clips[key]
            return Frames(state.images[key], tuple(clip["shown"]), tuple(clip["times"]), clip["sampled_fps"])
        return Image.fromarray(state.images[key])

    # ---- compressions -------------------------------------------------------------------------
    @staticmethod
    def method_for(state, key: str, method: str) -> str:
        """How image `key` is encoded for `method`: as itself, except that a manual method sends an image
        without picks as its fallback (VisionZip's choice: an earlier image nobody picked patches on)."""
        fallback = registry.get(method).fallback
        return fallback if fallback and not state.picks.get(key) else method

    def method_key(self, state, key: str, method: str) -> tuple:
        s = state.settings
        return method_key(self.method_for(state, key, method), s.dominant, s.contextual, s.max_tiles,
                          state.picks.get(key), s.knobs, state.question)

    def model(self, lane: str):
        return self.vlm if lane == "large" else self.small

    def cached(self, state, key, method: str, lane: str = "large") -> bool:
        """Whether `compression(state, key, method, lane)` is at hand (no model would run)."""
        return (key, self.method_key(state, key, method), self.model(lane).name) in state.compressions

    def compression(self, state, key, method: str, lane: str = "large") -> Compression:
        """The Compression of image `key` for `method` and `lane`'s model, encoded once."""
        vlm, method = self.model(lane), self.method_for(state, key, method)
        ck = (key, self.method_key(state, key, method), vlm.name)
        if ck in state.compressions:
            state.compressions.move_to_end(ck)
            return state.compressions[ck]
        s = state.settings
        ahead = self.examples.get(vlm.name, key, ck[1]) if self.examples is not None and lane == "large" else None
        if ahead is not None:  # an example image, compressed when the app started: nothing to encode
            state.compressions[ck] = ahead
            self.encoded[2] += 1
            return ahead
        selection = None  # the small model sees the same tokens: a compress-once method's selection by the large
        if lane != "large" and registry.get(method).kind in registry.BUDGETED:
            selection = self.compression(state, key, method)
        with vlm.encode_lock:
            comp = encode_image(vlm, self.image(state, key), method, s.dominant, s.contextual, max_tiles=s.max_tiles,
                                picks=state.picks.get(key, {}) if lane == "large" else None,
                                selection_from=selection, knobs=s.knobs, question=state.question,
                                vision=self.earlier_vision(state, ck))
        comp.features = comp.features.cpu()  # the state holds no device tensor
        self.encoded[0] += 1
        self.encoded[1] += comp.encode_s
        state.compressions[ck] = comp
        while sum(c.nbytes for c in state.compressions.values()) > state.cache_bytes and len(state.compressions) > 1:
            state.compressions.popitem(last=False)  # dropped ones are re-encoded from state.images if needed
        return comp

    @staticmethod
    def earlier_vision(state, ck: tuple):
        """The tower output kept by this image's selection for another question (same method, budget and model),
        or None: a question-conditioned method selects again without running the tower again."""
        key, method_key, model = ck
        for (k, other, m), comp in state.compressions.items():
            if k == key and m == model and comp.vision is not None and other[:-1] == method_key[:-1]:
                return comp.vision
        return None

    def slot(self, state, key, method: str, lane: str = "large") -> tuple:
        """-> (the key of image `key`'s slot in a prompt, its Compression for `method` and `lane`'s model). A
        selection made for the question is keyed by what it sends: the KV cache stays where it is the same."""
        comp, method_key = self.compression(state, key, method, lane), self.method_key(state, key, method)
        if comp.question:
            method_key = method_key[:-1] + (selection_digest(comp),)
        return ("i", key) + method_key, comp

    def prepare(self, state, method: str):
        """Encode the images waiting for the next question now (their time counts in that turn's)."""
        start = time.perf_counter()
        for key in state.pending:
            self.compression(state, key, method)
        self.ahead_s += time.perf_counter() - start
