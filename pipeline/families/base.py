"""What a model family is to the rest of zipchat: the interface every family module implements.

A family turns an image into crops (each with its box on the original image and its grid of
units), runs the vision tower to the feature layer while reading the one attention statistic
VisionZip needs, projects selected units into the language model's space, and gives transformers'
own features for the uncompressed image. It also names its checkpoints, its chat template copy,
its tiny and architecture configs, and the rotary function SGL's hooks need. Nothing outside the
family module touches that family's transformers internals.

A *unit* is one token the LLM receives for an image: a patch (CLIP, SigLIP) or a merged token
(InternVL's pixel shuffle). VisionZip selects units.
"""

import importlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import transformers
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from ..video import check_frames


COMPACT_CAPS = (None, 1, 2, 4, 6, 9, 12)  # tile caps whose layout `compact_size` keeps
CPU_FRAMES = 8  # the frames a clip is sampled at on a CPU


@dataclass
class Crop:
    """One input of the vision tower and where it came from on the original image."""
    box: tuple  # (x0, y0, x1, y1) in original-image pixels
    grid: tuple  # (rows, cols) of units


@dataclass
class Prepared:
    pixel_values: torch.Tensor | None  # (num_crops, 3, S, S); None from `layout`
    crops: list  # list[Crop], same order as pixel_values
    image_size: tuple  # (height, width) of the original image
    tile_grid: tuple = (1, 1)  # (rows, cols) of tiles, the base image or thumbnail excluded
    extra: dict = field(default_factory=dict)  # what the family's own processing needs again


@dataclass
class VisionOutput:
    units: torch.Tensor  # (crops, U, C) projector inputs of the selectable units (CLS first when has_cls)
    scores: torch.Tensor | None = None  # (crops, U) attention statistic per unit
    keys: torch.Tensor | None = None  # (crops, U, d) keys per unit, averaged over heads (not normalised)
    received: dict = field(default_factory=dict)  # tower layer (0-based) -> (crops, U): the mean over heads and
    # queries (CLS included) of the attention each unit receives there (`encode(received_at=...)`)


class Family:
    name: str  # short name, e.g. "llava"
    model_type: str  # config.model_type of its checkpoints
    model_class: type  # the transformers class
    image_processor_class: type  # its image processor with the PIL backend (the same preprocessing with or without torchvision)
    has_cls: bool  # the CLS token is a selectable unit (counted as a dominant token)
    chat_template: str  # a copy of the checkpoints' template, for checkpoints that ship none
    stop_strings: tuple  # end-of-turn tokens besides EOS
    presets: dict = {}  # preset name -> hub repository
    sgl_pairs: dict = {}  # large preset -> small preset of the same visual layout
    tiny: dict = {}  # tiny preset name -> spec (see tiny.py)
    arch: dict = {}  # architecture preset name -> (vision shape, text shape)
    tiny_special_tokens: dict = {}  # tiny tokenizer: role ("bos_token", ...) -> token, plus "extra" tokens
    # The ordered tokens an image contributes for every placeholder the template emits: the units in
    # the middle, and markers around them where the family has them (InternVL's <img> ... </img>).
    image_start: str | None = None
    image_end: str | None = None
    position_rows = 1  # P of `positions`: 1, or 3 for M-RoPE (t, h, w)
    tiles = False  # `prepare(max_tiles=)` caps what is encoded (tiles; Qwen2.5-VL: the area of as many)
    clip_text_source: str | None = None  # the CLIP checkpoint its vision tower was cut from, for CLIP's text tower
    # (CDPruner's relevance; text_tower.py); None: the tower has no per-token image-text space to use
    tile_cap_label = "tiles per image VisionZip encodes"  # what the cap means, in the UI
    keeps_index_order = False  # compressed tokens in unit order (M-RoPE), not dominant-then-contextual

    def __init__(self, config, image_processor, tokenizer):
        self.config = config
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        vc = config.vision_config
        self.vision_depth = getattr(vc, "num_hidden_layers", None) or vc.depth  # the tower's layers (blocks)

    # ---- vision ------------------------------------------------------------------------------------
    @cached_property
    def processor_defaults(self) -> dict:
        """The image options the family's transformers Processor passes over preprocessor_config.json
        (InternVLProcessor: crop_to_patches=True; LlavaNextProcessor: do_pad=True): the class transformers'
        AutoProcessor picks for the model type."""
        return processor_image_defaults(getattr(transformers, PROCESSOR_MAPPING_NAMES[self.model_type]))

    def image_option(self, name: str, **call):
        """One image option as the image processor will see it: zipchat's own call argument, else the
        Processor's default, else preprocessor_config.json's value."""
        if name in call:
            return call[name]
        return self.processor_defaults.get(name, getattr(self.image_processor, name, None))

    def preprocess(self, image, **call):
        """The image processor called as the family's Processor calls it, with zipchat's own arguments
        (the tile cap) over the Processor's defaults over preprocessor_config.json."""
        return self.image_processor(images=[image], return_tensors="pt", **{**self.processor_defaults, **call})

    @property
    def units_per_crop(self) -> int:
        """Selectable units of one crop (CLS included when it is one): the largest VisionZip budget."""
        raise NotImplementedError

    @property
    def unit_pixels(self) -> float:
        """Side, in the tower's input pixels, of one unit (a patch, or the 2x2 patches a merged unit holds)."""
        raise NotImplementedError

    def compact_size(self, size: tuple, caps=COMPACT_CAPS) -> tuple:
        """(width, height) to keep an image of `size` at: no larger than the processor can use, scaled
        down (aspect kept) until some crop would be upsampled, and only as far as every tile cap in
        `caps` still gives the same tile grid and crops (in proportion). A 36 MP photo is kept at ~5 MP
        on OneVision, 0.45 MP on LLaVA-NeXT. By arithmetic: no pixels are needed."""
        w, h = size
        layouts = [self.layout(_Sized(size), cap) for cap in caps]
        scale = max(max(c.grid[1] * self.unit_pixels / (c.box[2] - c.box[0]),  # the crop that needs the most
                        c.grid[0] * self.unit_pixels / (c.box[3] - c.box[1])) for c in layouts[0].crops)
        while scale < 0.95:  # a few tries upwards when rounding moves a grid; else keep the original
            smaller = (max(1, round(w * scale)), max(1, round(h * scale)))
            if all(same_layout(a, self.layout(_Sized(smaller), cap)) for a, cap in zip(layouts, caps)):
                return smaller
            scale *= 1.1
        return tuple(size)

    def layout(self, image, max_tiles: int | None = None) -> Prepared:
        """What `prepare` gives, without the pixels (`pixel_values` None): the crops with their boxes,
        the image size and the tile grid, by arithmetic alone (counting an image's uncompressed tokens
        needs no preprocessing)."""
        raise NotImplementedError

    def prepare(self, image, max_tiles: int | None = None) -> Prepared:
        """The image as the processor feeds the tower, on `layout`'s crops; `max_tiles` caps the number
        of tiles of tiling families (a CPU saving; None: as many as the checkpoint allows)."""
        raise NotImplementedError

    def tower_layers(self, model) -> list:
        """The vision tower's encoder layers (for tests and benchmarks that count what runs)."""
        raise NotImplementedError

    def encode(self, model, prepared: Prepared, with_stats: bool, received_at: tuple = ()) -> VisionOutput:
        """Run the tower to the feature layer (SDPA everywhere, nothing after it); with `with_stats`
        also the unit scores and keys, computed from the captured input of the feature layer, and the global
        attention each unit receives at the layers `received_at` (0-based, up to the feature layer), each
        computed from that layer's captured input (no layer runs eager)."""
        raise NotImplementedError

    def project(self, model, units: torch.Tensor) -> torch.Tensor:
        """(crops, k, C) selected units -> (crops, k, D) tokens for the LLM."""
        raise NotImplementedError

    def project_parts(self, model):
        """(inner, last) with project(u) == last(inner(u)) and `last` affine (the projector's last linear
        layer), so a mean of projected units is last(mean of inner): Pool projects its cells' means
        through `last` instead of every unit. None: only the whole projector."""
        return None

    def encode_full(self, model, prepared: Prepared) -> torch.Tensor:
        """(N, D): transformers' own image features for the LLM, uncompressed."""
        raise NotImplementedError

    def full_token_map(self, model, prepared: Prepared) -> np.ndarray:
        """(N, 3) crop, unit (-1: CLS, newline), -1 for every token of `encode_full`, in order."""
        raise NotImplementedError

    # ---- video -------------------------------------------------------------------------------------
    takes_video = False  # its checkpoints take clips (video.py)
    video_size: tuple | None = None  # (width, height) its video processor resizes every frame to (fixed sizes)
    video_frames = 32  # the frames a clip is sampled at on a GPU (the checkpoint's)
    frames_per_crop = 1  # frames one crop of the tower's input holds (Qwen2.5-VL: its temporal patch, 2)

    def video_sample(self, num_frames: int | None, on_gpu: bool) -> tuple:
        """(num_frames, sample) for video.read_clip: `num_frames` asked (None: the checkpoint's on a GPU, CPU_FRAMES on
        a CPU), at transformers' uniform indices."""
        return check_frames((self.video_frames if on_gpu else CPU_FRAMES) if num_frames is None else num_frames), None

    def video_frame_size(self, shown: tuple, max_tiles: int | None = None) -> tuple:
        """(width, height) its video processor resizes frames of size `shown` to (`max_tiles`: zipchat's cap)."""
        return self.video_size

    def prepare_video(self, frames, max_tiles: int | None = None) -> Prepared:
        """video.Frames (at `video_frame_size(frames.shown)`) -> the tower's input, one crop per `frames_per_crop`
        frames, each crop's box the whole frame; extra: "video", "times" (of each crop's first frame)."""
        raise NotImplementedError

    def encode_video_full(self, model, prepared: Prepared) -> torch.Tensor:
        """(N, D): transformers' own video features for the LLM (get_video_features), uncompressed."""
        raise NotImplementedError

    def video_token_map(self, model, prepared: Prepared) -> np.ndarray:
        """(N, 3) crop, unit (-1: newline), -1 for every token of `encode_video_full`, in order."""
        raise NotImplementedError

    # ---- language model ----------------------------------------------------------------------------
    def image_ids(self, n: int, image_token_id: int) -> list:
        """The ids one image with `n` visual tokens puts in the prompt (features go where the id is
        image_token_id)."""
        ids = [image_token_id] * n
        start = [self.tokenizer.convert_tokens_to_ids(self.image_start)] if self.image_start else []
        end = [self.tokenizer.convert_tokens_to_ids(self.image_end)] if self.image_end else []
        return start + ids + end

    def visual_ids(self, comp, image_token_id: int) -> list:
        """The ids a Compression puts in the prompt: `image_ids` of its tokens (InternVL3's clips: a line per
        frame with "Frame k: " before its tokens)."""
        return self.image_ids(comp.num_tokens, image_token_id)

    def positions(self, ids: list, slots: list) -> torch.Tensor:
        """(P, L) the language model's positions of a flat sequence (`slots`: prompt.Slot per text token
        or image). One index per token here; families with positions tied to the image layout
        (Qwen2.5-VL's M-RoPE) give P = 3."""
        return torch.arange(len(ids))[None]

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """(P, n) positions -> what the language model and its rotary embedding take as position_ids."""
        return positions

    def budget(self, dominant: int, contextual: int, units: int) -> tuple:
        """(dominant, contextual) for one crop of `units` units: the same for every crop here; a share
        of the image's units for dynamic-resolution families."""
        return dominant, contextual

    def rotary(self, attention_module):
        """The function that rotates queries (and keys) in this attention module, as it does itself:
        (q, k, cos, sin) -> (q, k). SGL's hooks use it to read the queries the layer really uses."""
        return importlib.import_module(type(attention_module).__module__).apply_rotary_pos_emb

    # ---- tiny and architecture models --------------------------------------------------------------
    tiny_vision: dict = {}  # the tiny model's vision config values besides tiny.py's common ones

    @classmethod
    def tiny_model(cls, spec: dict, tokenizer, text: dict, vision: dict):
        """-> (model, image processor) with random weights: the architecture config with the tiny
        `text` and `vision` values (plus `tiny_vision`)."""
        config, processor = cls.arch_config(dict(vision, **cls.tiny_vision), text, tokenizer)
        return cls.model_class(config), processor

    @classmethod
    def arch_config(cls, vision: dict, text: dict, tokenizer):
        """-> (config, image processor) of an architecture preset (real shapes)."""
        raise NotImplementedError


class _Sized:
    """What `layout` reads of an image (its size), for sizes not yet resized to."""
    def __init__(self, size):
        self.size = size


def distinct_crops(pixel_values: torch.Tensor) -> tuple:
    """(indices of the distinct crops, for each crop the position of its pixels among them). A small square
    on OneVision (or on LLaVA-NeXT under a 1x1 tile cap) has a base image and one tile of the same pixels."""
    keep, inverse, signatures = [], [], pixel_values.flatten(1).sum(1).tolist()
    for i, signature in enumerate(signatures):
        j = next((n for n, k in enumerate(keep)
                  if signatures[k] == signature and torch.equal(pixel_values[k], pixel_values[i])), None)
        if j is None:
            keep.append(i)
            j = len(keep) - 1
        inverse.append(j)
    return keep, inverse


def same_layout(a: Prepared, b: Prepared) -> bool:
    """The same tile grid, crops and unit grids, the boxes in the same place relative to each image."""
    if a.tile_grid != b.tile_grid or [c.grid for c in a.crops] != [c.grid for c in b.crops]:
        return False
    (ha, wa), (hb, wb) = a.image_size, b.image_size
    rel = lambda box, w, h: np.array(box, dtype=np.float64) / [w, h, w, h]  # noqa: E731
    return all(np.abs(rel(x.box, wa, ha) - rel(y.box, wb, hb)).max() < 0.01 for x, y in zip(a.crops, b.crops))


def processor_image_defaults(processor_class) -> dict:
    """`images_kwargs` defaults of a transformers Processor class, read from the class (never built:
    some need torchvision): a class attribute `images_kwargs` in transformers >= 5.24, the module's
    `<Processor>Kwargs._defaults["images_kwargs"]` before."""
    defaults = getattr(processor_class, "images_kwargs", None)
    if not isinstance(defaults, dict):
        module = importlib.import_module(processor_class.__module__)
        kwargs = vars(module).get(processor_class.__name__ + "Kwargs")  # not getattr: 5.24 warns on the old name
        defaults = (getattr(kwargs, "_defaults", None) or {}).get("images_kwargs")
    return dict(defaults or {})


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Index into hidden_states (0 = embeddings) -> number of encoder layers to run."""
    return vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
