"""InternVL3 (OpenGVLab/InternVL3-*-hf): InternViT-300M-448px with CLS, read at its last layer; the image
squashed onto a grid of 448 px tiles chosen by aspect ratio (1 to 12), plus a thumbnail of the whole
image after the tiles when there is more than one; pixel shuffle 2x2 turns each tile's 32x32 patches
into 16x16 = 256 units; Qwen2.5 as the language model.

VisionZip selects units: a unit's score is the mean, over the 4 patches it merges, of the feature
layer's CLS attention row (summed over heads), and its key the mean of their keys (averaged over
heads). CLS is never a unit. The budget counts units per tile (54 + 10 of 256 by default).
"""

from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                          InternVLVisionConfig, Qwen2Config)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from ..video import check_frames
from .base import Crop, Family, Prepared, VisionOutput, feature_layer_index

# A copy of OpenGVLab/InternVL3-*-hf's chat template
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      attention_bias=True, image_size=448, patch_size=14, layer_scale_init_value=0.1)
QWEN25 = dict(vocab_size=151674, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
QWEN25_05B = dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True)
QWEN25_7B = dict(QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)
QWEN25_14B = dict(QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                  num_key_value_heads=8)


class InternVL(Family):
    name = "internvl"
    model_type = "internvl"
    model_class = InternVLForConditionalGeneration
    image_processor_class = GotOcr2ImageProcessorPil  # the PIL backend: no torchvision needed
    # InternVLProcessor turns tiling on (crop_to_patches), which the checkpoints ship off
    has_cls = False  # InternViT has a CLS token, but it is never sent to the LLM: it only scores the units
    chat_template = TEMPLATE
    tiles = True
    stop_strings = ("<|im_end|>", "<|endoftext|>")
    image_start, image_end = "<img>", "</img>"
    presets = {f"internvl3-{size}": f"OpenGVLab/InternVL3-{size.upper()}-hf" for size in ("1b", "2b", "8b", "14b")}
    sgl_pairs = {"internvl3-8b": "internvl3-1b", "internvl3-14b": "internvl3-1b",
                 "tiny-internvl-large": "tiny-internvl-small"}
    tiny = {"tiny-internvl-small": dict(vision_layers=3, text_hidden=64, text_layers=2, text_heads=4),
            "tiny-internvl-large": dict(vision_layers=3, text_hidden=128, text_layers=4, text_heads=8),
            "tiny-internvl-h32": dict(vision_layers=3, text_hidden=64, text_layers=2, text_heads=2)}  # head size 32: vLLM
    arch = {"internvl3-1b-arch": (INTERNVIT_300M, QWEN25_05B), "internvl3-8b-arch": (INTERNVIT_300M, QWEN25_7B),
            "internvl3-14b-arch": (INTERNVIT_300M, QWEN25_14B)}
    tiny_special_tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tiny_extra_tokens = ["<img>", "</img>", "<IMG_CONTEXT>"]
    tiny_vision = dict(image_size=448, attention_bias=True, layer_scale_init_value=1.0, initializer_range=0.3)

    def __init__(self, config, image_processor, tokenizer):
        super().__init__(config, image_processor, tokenizer)
        vc = config.vision_config
        self.side = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        self.patches = self.side // patch  # patches per side of a tile (32)
        self.merge = round(1 / config.downsample_ratio)  # 2: pixel shuffle 2x2
        self.grid = (self.patches // self.merge,) * 2  # units per side of a tile (16)
        self.num_layers_to_run = feature_layer_index(config.vision_feature_layer, vc.num_hidden_layers)

    @property
    def units_per_crop(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def unit_pixels(self) -> float:
        return self.side / self.grid[0]  # 28: 2x2 patches of 14 px

    def tower(self, model):
        return model.model.vision_tower

    def tower_layers(self, model):
        return self.tower(model).encoder.layer

    def most_tiles(self, max_tiles=None) -> int:
        ip = self.image_processor
        return ip.max_patches if max_tiles is None else max(ip.min_patches, min(ip.max_patches, max_tiles))

    def layout(self, image, max_tiles=None) -> Prepared:
        ip, most = self.image_processor, self.most_tiles(max_tiles)
        w, h = image.size
        cols, rows = 1, 1  # without tiling: the whole image squashed to one tile
        if self.image_option("crop_to_patches") and most > 1:  # as the image processor decides
            cols, rows = get_optimal_tiled_canvas((h, w), (self.side, self.side), ip.min_patches, most)
        crops = [Crop((c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows), self.grid)
                 for r in range(rows) for c in range(cols)]
        if rows * cols > 1:  # the thumbnail comes after the tiles
            crops.append(Crop((0, 0, w, h), self.grid))
        return Prepared(None, crops, (h, w), (rows, cols))

    def prepare(self, image, max_tiles=None) -> Prepared:
        pixels = self.preprocess(image, max_patches=self.most_tiles(max_tiles))
        return replace(self.layout(image, max_tiles), pixel_values=pixels["pixel_values"])  # (tiles + thumbnail, 3, 448, 448)

    def unit_patches(self, model) -> torch.Tensor:
        """(units, 4) the patch indices each unit merges, read off transformers' own pixel_shuffle."""
        index = torch.arange(self.patches ** 2, dtype=torch.float32).reshape(1, self.patches, self.patches, 1)
        shuffled = model.model.pixel_shuffle(index, scale_factor=self.config.downsample_ratio)  # (1, 16, 16, 4)
        return shuffled.reshape(-1, self.merge ** 2).long()

    def encode(self, model, prepared, with_stats, received_at=()):
        tower = self.tower(model)
        pixels = prepared.pixel_values.to(tower.device, tower.dtype)
        layers = tower.encoder.layer
        captured = {}
        feature = self.num_layers_to_run - 1
        wanted = {feature, *received_at} if with_stats else set()
        hooks = [layers[i].register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
                 for i in sorted(wanted)]
        try:
            h = tower.embeddings(pixels)  # (crops, 1 + 1024, C)
            for layer in layers[: self.num_layers_to_run]:
                h = layer(h)
        finally:
            for hook in hooks:
                hook.remove()
        if self.config.vision_feature_layer == -1:
            h = tower.layernorm(h)  # what transformers reads as last_hidden_state
        units = self.shuffle(model, h[:, 1:])  # (crops, 256, 4C)
        if not with_stats:
            return VisionOutput(units=units)
        scores, keys = cls_attention(layers[feature], captured[feature])  # (crops, 1 + 1024), ...
        groups = self.unit_patches(model).to(scores.device)  # (256, 4)
        received = {i: global_attention(layers[i], captured[i])[:, 1:][:, groups].mean(-1) for i in received_at}
        return VisionOutput(units=units, scores=scores[:, 1:][:, groups].mean(-1), keys=keys[:, 1:][:, groups].mean(2),
                            received=received)

    def shuffle(self, model, patches: torch.Tensor) -> torch.Tensor:
        """(crops, 1024, C) -> (crops, 256, 4C), as transformers' get_image_features does."""
        n = patches.shape[0]
        grid = patches.reshape(n, self.patches, self.patches, -1)
        return model.model.pixel_shuffle(grid, scale_factor=self.config.downsample_ratio).reshape(n, -1, grid.shape[-1] * 4)

    def project(self, model, units):
        return model.model.multi_modal_projector(units)

    def project_parts(self, model):
        p = model.model.multi_modal_projector  # layer_norm -> linear_1 -> act -> linear_2
        return (lambda units: p.act(p.linear_1(p.layer_norm(units)))), p.linear_2

    def encode_full(self, model, prepared):
        tower = self.tower(model)
        out = model.model.get_image_features(prepared.pixel_values.to(tower.device, tower.dtype),
                                             vision_feature_layer=self.config.vision_feature_layer,
                                             vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        return out.pooler_output.flatten(0, 1)  # (crops * 256, D)

    def full_token_map(self, model, prepared):
        units = self.units_per_crop
        return np.array([(i, u, -1) for i in range(len(prepared.crops)) for u in range(units)],
                        dtype=np.int64).reshape(-1, 3)

    # video: as InternVLProcessor takes a clip (the model card feeds frames the same way): each sampled frame one
    # 448 px tile (no tiling; the image processor's resize, mean and std), its 256 units after the pixel shuffle,
    # a line per frame in the prompt: "Frame1: <img>...</img>\nFrame2: <img>...</img>"; frames sampled at the
    # middle of equal segments (InternVLVideoProcessor.sample_frames, initial_shift: arange(total / n / 2, total,
    # total / n).int()), 8 of them as in the model card.
    takes_video = True
    video_frames = 8

    @property
    def video_size(self):
        return self.side, self.side

    def video_sample(self, num_frames, on_gpu):
        n = check_frames(self.video_frames if num_frames is None else num_frames)

        def middles(info):
            count = min(n, info.total_frames)
            return torch.arange(info.total_frames / count / 2, info.total_frames, info.total_frames / count).int().numpy()
        return None, middles

    def prepare_video(self, frames, max_tiles=None):
        """Each frame as the image processor prepares a 448x448 image with tiling off: exactly the image path."""
        pixels = torch.cat([self.preprocess(Image.fromarray(f), crop_to_patches=False)["pixel_values"]
                            for f in frames.pixels])  # (F, 3, 448, 448)
        crop = Crop((0, 0, *frames.shown), self.grid)
        return Prepared(pixels, [crop] * len(pixels), (frames.shown[1], frames.shown[0]), (1, len(pixels)),
                        extra={"video": True, "times": tuple(frames.times)})

    def encode_video_full(self, model, prepared):
        return self.encode_full(model, prepared)  # (the processor sends a clip's frames as images)

    def video_token_map(self, model, prepared):
        return self.full_token_map(model, prepared)

    def visual_ids(self, comp, image_token_id):
        """A clip: "Frame1: <img>" + its tokens + "</img>", a line per frame (InternVLProcessor's
        replace_video_token), the text between the markers tokenized as the processor's whole prompt is."""
        if comp.times is None:
            return super().visual_ids(comp, image_token_id)
        counts = np.bincount(comp.token_map[:, 0], minlength=len(comp.crops))
        ids = []
        for k, n in enumerate(counts):
            ids += self.tokenizer.encode(f"{chr(10) if k else ''}Frame{k + 1}: ", add_special_tokens=False)
            ids += self.image_ids(int(n), image_token_id)
        return ids

    @classmethod
    def arch_config(cls, vision, text, tokenizer):
        config = InternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
                                image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
        return config, cls.processor()

    @staticmethod
    def processor():  # OpenGVLab/InternVL3-*-hf's preprocessor_config.json: tiling off here, on by InternVLProcessor
        return GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=False, min_patches=1,
                                        max_patches=12, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def global_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """InternViT layer input x (B, T, C) -> (B, T): mean over heads and queries (CLS included) of
    softmax(q_i . k_j * scale), the attention each token receives (HiPrune's statistic)."""
    attn = layer.attention
    B, T, _ = x.shape
    x = layer.layernorm_before(x)
    k = attn.k_norm(attn.k_proj(x)).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
    q = attn.q_norm(attn.q_proj(x)).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=(1, 2))


def cls_attention(layer, x: torch.Tensor):
    """InternViT layer input x (B, T, C) -> (scores (B, T): sum over heads of softmax(q_CLS . k_j * scale),
    keys averaged over heads (B, T, d)), computed as the layer's own attention does."""
    attn = layer.attention
    B, T, _ = x.shape
    x = layer.layernorm_before(x)
    k = attn.k_norm(attn.k_proj(x)).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
    q = attn.q_norm(attn.q_proj(x))[:, :1].view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, 1, d)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (B, H, 1, T)
    return probs.sum(dim=1)[:, 0], k.mean(dim=1)
