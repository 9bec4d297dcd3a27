"""Presets, `load_vlm`, and the two family adapters (LLaVA-1.5/CLIP and LLaVA-OneVision/SigLIP).

An adapter knows what differs between families: how an image becomes crops (and where each crop
sits on the original image), which vision layer feeds the projector, whether there is a CLS token,
how full-resolution features are packed, and the chat format. Everything else is shared.
"""

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

from .arch import ARCH_PRESETS, build_arch_model
from .chat import ChatFormat, control_ids
from .errors import ModelUnavailable
from .templates import LLAVA_TEMPLATE, ONEVISION_TEMPLATE
from .tiny import TINY_SPECS, ensure_tiny_model

# name -> Hugging Face hub repository (transformers-native checkpoints, no remote code)
HUB_PRESETS = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-ov-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-ov-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}
SGL_PAIRS = {"llava-ov-7b": "llava-ov-0.5b", "llava-1.5-13b": "llava-1.5-7b", "tiny-ov-large": "tiny-ov-small"}
PRESETS = list(HUB_PRESETS) + list(TINY_SPECS) + list(ARCH_PRESETS)

MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}


@dataclass
class Crop:
    """One square input of the vision tower and where it came from on the original image."""
    box: tuple  # (x0, y0, x1, y1) in original-image pixels
    grid: tuple  # (rows, cols) of patches


@dataclass
class Prepared:
    pixel_values: torch.Tensor  # (num_crops, 3, S, S)
    crops: list  # list[Crop], same order as pixel_values
    image_size: tuple  # (height, width) of the original image
    tile_grid: tuple = (1, 1)  # (rows, cols) of anyres tiles (OneVision), base image excluded


@dataclass
class VLM:
    """A loaded vision-language model and everything needed to talk to it."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    adapter: object
    device: torch.device
    dtype: torch.dtype
    is_tiny: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def describe(self) -> str:
        return f"{self.name} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"

    @cached_property
    def chat(self) -> ChatFormat:
        """The checkpoint's chat template (the family's copy of it when the checkpoint has none)."""
        template = self.tokenizer.chat_template or self.adapter.chat_template
        return ChatFormat(self.tokenizer, template, self.image_token_id)

    @cached_property
    def stop_ids(self) -> frozenset:
        return frozenset(self.adapter.stop_ids())

    @cached_property
    def banned_ids(self) -> frozenset:
        """Ids generation never emits: control tokens that are not stop tokens (image placeholders,
        chat markers, BOS, padding) and embedding rows past the tokenizer's vocabulary."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return frozenset((control_ids(self.tokenizer) | {self.image_token_id} | set(range(len(self.tokenizer), vocab)))
                         - self.stop_ids)

    @property
    def context_window(self) -> int:
        """Positions the language model was trained for (prompt + answer)."""
        return int(self.language_model.config.max_position_embeddings)


def default_preset() -> str:
    """The model to start with on this hardware: a 7B OneVision on a GPU, the 0.5B one on a CPU."""
    return "llava-ov-7b" if torch.cuda.is_available() else "llava-ov-0.5b"


def default_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        if device.type == "cuda":
            try:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            except RuntimeError:  # ZeroGPU's main process has no GPU to ask; its GPUs (A100/H200) have bf16
                dtype = torch.bfloat16
        else:
            dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def resolve(name_or_path: str) -> tuple:
    """-> (local path or hub id, is_tiny)."""
    if name_or_path in TINY_SPECS:
        return str(ensure_tiny_model(name_or_path)), True
    if name_or_path in HUB_PRESETS:
        return HUB_PRESETS[name_or_path], False
    if name_or_path in ARCH_PRESETS:
        return name_or_path, True
    if Path(name_or_path).is_dir():
        return name_or_path, False
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path, False  # a hub repository id
    raise ModelUnavailable(
        f"Unknown model '{name_or_path}'. Use a preset ({', '.join(PRESETS)}), "
        "a Hugging Face repository id, or a local directory."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection instead of the hub client's retries with back-off (~25 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_vlm(name_or_path: str, device=None, dtype=None, quick: bool = False) -> "VLM":
    """Load a transformers-native LLaVA-1.5 or LLaVA-OneVision model (preset, hub id or directory).
    "*-arch" presets are the real shapes with random weights (benchmarks; `quick` shrinks them)."""
    device, dtype = default_device_dtype(device, dtype)
    if name_or_path in ARCH_PRESETS:
        model, tokenizer, image_processor = build_arch_model(name_or_path, device, dtype, quick)
        adapter_cls = LlavaAdapter if model.config.model_type == "llava" else OnevisionAdapter
        return VLM(name=name_or_path + ("-quick" if quick else ""), model=model, tokenizer=tokenizer,
                   image_processor=image_processor, adapter=adapter_cls(model.config, image_processor, tokenizer),
                   device=device, dtype=dtype, is_tiny=True)
    source, is_tiny = resolve(name_or_path)
    local_only = Path(source).is_dir() or is_cached(source)
    if not local_only and not hub_reachable():
        raise ModelUnavailable(
            f"'{name_or_path}' ({source}) is not in the local Hugging Face cache and the hub cannot be reached. "
            "Download it where there is network (`hf download " + source + "`) or pass a local directory."
        )
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source)
        if config.model_type not in MODEL_CLASSES:
            raise ModelUnavailable(
                f"'{name_or_path}' is a {config.model_type} model; zipchat supports llava and llava_onevision."
            )
        model = MODEL_CLASSES[config.model_type].from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.chat_template = tokenizer.chat_template or checkpoint_chat_template(source)
        with _quiet_transformers():  # "falling back to the PIL backend" without torchvision is expected
            image_processor = AutoImageProcessor.from_pretrained(source)
    except ModelUnavailable:
        raise
    except (OSError, ValueError) as e:
        raise ModelUnavailable(
            f"Could not load '{name_or_path}' ({source}): {str(e).splitlines()[0]}. Without network, download "
            f"it elsewhere with `hf download {source}` and pass the local directory."
        ) from None
    model.to(device).eval()
    adapter_cls = LlavaAdapter if config.model_type == "llava" else OnevisionAdapter
    return VLM(name=name_or_path, model=model, tokenizer=tokenizer, image_processor=image_processor,
               adapter=adapter_cls(model.config, image_processor, tokenizer), device=device, dtype=dtype,
               is_tiny=is_tiny)


def checkpoint_chat_template(source: str) -> str | None:
    """The processor-level chat template of a checkpoint (chat_template.jinja or .json), if any."""
    import json
    from transformers.utils import cached_file
    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


class _quiet_transformers:
    def __enter__(self):
        self.logger = logging.getLogger("transformers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Index into hidden_states (0 = embeddings) -> number of encoder layers to run."""
    return vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer


class _Adapter:
    has_cls: bool
    chat_template: str

    def __init__(self, config, image_processor, tokenizer):
        self.config = config
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        vc = config.vision_config
        self.side = vc.image_size
        self.patch = vc.patch_size
        self.grid = (vc.image_size // vc.patch_size,) * 2
        if not isinstance(config.vision_feature_layer, int):
            raise ModelUnavailable("Models that concatenate several vision feature layers are not supported.")
        self.num_layers_to_run = feature_layer_index(config.vision_feature_layer, vc.num_hidden_layers)

    def stop_ids(self) -> set:
        ids = {self.tokenizer.eos_token_id}
        for tok in self.stop_strings:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return {i for i in ids if i is not None}


class LlavaAdapter(_Adapter):
    """LLaVA-1.5: CLIP ViT-L/14-336 with CLS, one 336x336 crop, Vicuna v1 chat format."""
    family = "llava"
    has_cls = True
    stop_strings = ("</s>",)
    chat_template = LLAVA_TEMPLATE

    def prepare(self, image) -> Prepared:
        out = self.image_processor(images=[image], return_tensors="pt")
        pixel_values = out["pixel_values"]  # (1, 3, 336, 336)
        w, h = image.size
        ip = self.image_processor
        if getattr(ip, "do_center_crop", False):  # shortest edge -> side, then a centred square
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        elif getattr(ip, "do_pad", False):  # padded to a square: the square extends past the image
            s = max(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        else:  # squashed to a square
            box = (0, 0, w, h)
        return Prepared(pixel_values, [Crop(box, self.grid)], (h, w))

    def pack_full(self, model, crop_features: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """(1, 1+N, D) projector output with CLS -> (N, D): HF's 'default' strategy drops CLS."""
        if self.config.vision_feature_select_strategy == "default":
            return crop_features[0, 1:]
        return crop_features[0]


class OnevisionAdapter(_Adapter):
    """LLaVA-OneVision: SigLIP-384 without CLS, a base image plus anyres tiles, Qwen2 chat format."""
    family = "llava_onevision"
    has_cls = False
    stop_strings = ("<|im_end|>", "<|endoftext|>")
    chat_template = ONEVISION_TEMPLATE

    def prepare(self, image) -> Prepared:
        out = self.image_processor(images=[image], return_tensors="pt")
        pixel_values = out["pixel_values"][0]  # (1 + tiles, 3, 384, 384)
        h, w = out["image_sizes"][0].tolist()
        best_h, best_w = select_best_resolution((h, w), self.config.image_grid_pinpoints)
        rows, cols = best_h // self.side, best_w // self.side
        # The image is resized to fit (best_h, best_w) and centred with padding; tiles cut that canvas.
        new_h, new_w = get_patch_output_size(np.zeros((1, h, w)), (best_h, best_w), input_data_format="channels_first")
        pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
        sy, sx = new_h / h, new_w / w
        crops = [Crop((0, 0, w, h), self.grid)]
        for r in range(rows):
            for c in range(cols):
                x0, y0 = (c * self.side - pad_x) / sx, (r * self.side - pad_y) / sy
                crops.append(Crop((x0, y0, x0 + self.side / sx, y0 + self.side / sy), self.grid))
        return Prepared(pixel_values[: len(crops)], crops, (h, w), (rows, cols))

    def pack_full(self, model, crop_features, prepared):
        """(crops, N, D) -> HF's packing: base tokens, then unpadded tiles with a newline per row."""
        image_sizes = torch.tensor([prepared.image_size])
        packed, _ = model.model.pack_image_features(
            [crop_features], image_sizes, image_newline=model.model.image_newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return packed[0]
