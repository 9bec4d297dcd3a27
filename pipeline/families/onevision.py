"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf): SigLIP-so400m/14-384 without CLS, read at its
last layer; the base image plus anyres tiles (up to 6x6 of 384 px); Qwen2. With all tokens,
transformers' own packing (unpadding, a newline per row, anyres_max_9 pooling) is used unchanged."""

import numpy as np
import torch
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                          Qwen2Config, SiglipVisionConfig)

from .base import Crop, Prepared
from .llava_common import AnyresStyle, run_tower

# A copy of llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]  # 1x1 .. 6x6 tiles of 384 px
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     patch_size=14, image_size=384, vision_use_head=False)
QWEN2_05B = dict(max_position_embeddings=32768,
                 hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN2_7B = dict(max_position_embeddings=32768,
                 hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6)


class OneVision(AnyresStyle):
    name = "llava_onevision"
    model_type = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    image_processor_class = LlavaOnevisionImageProcessorPil  # the PIL backend: no torchvision needed
    has_cls = False
    chat_template = TEMPLATE
    stop_strings = ("<|im_end|>", "<|endoftext|>")
    presets = {"llava-ov-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
               "llava-ov-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}
    sgl_pairs = {"llava-ov-7b": "llava-ov-0.5b", "tiny-ov-large": "tiny-ov-small"}
    tiny = {"tiny-ov-small": dict(vision_layers=3, text_hidden=64, text_layers=2, text_heads=4),
            "tiny-ov-large": dict(vision_layers=3, text_hidden=128, text_layers=4, text_heads=8),
            "tiny-ov-h32": dict(vision_layers=3, text_hidden=64, text_layers=2, text_heads=2)}  # head size 32: vLLM's CPU kernels
    tiny_vision = dict(image_size=384, vision_use_head=False)
    arch = {"llava-ov-0.5b-arch": (SIGLIP_SO400M, QWEN2_05B), "llava-ov-7b-arch": (SIGLIP_SO400M, QWEN2_7B)}
    tiny_special_tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")

    # video: video_processor/preprocessor_config.json of the llava-hf checkpoints: every frame resized to 384x384
    # (bicubic), rescaled by 1/255, normalised with mean = std = 0.5; no tiles. transformers' get_video_features:
    # the tower per frame, the projector, a 2x2 bilinear pooling (27x27 -> 14x14), the frames in order and one
    # newline after the last.
    takes_video = True
    video_size = (384, 384)
    video_mean = video_std = 0.5

    def prepare_video(self, frames, max_tiles=None):
        x = (torch.from_numpy(frames.pixels).permute(0, 3, 1, 2).double() * (1 / 255)).float()  # (F, 3, 384, 384)
        # (rescaled in float64, as the image processor's PIL backend does: a frame's pixels equal the image path's)
        w, h = frames.shown
        return Prepared((x - self.video_mean) / self.video_std, [Crop((0, 0, w, h), self.grid) for _ in frames.pixels],
                        (h, w), (1, len(frames.pixels)), extra={"video": True, "times": tuple(frames.times)})

    def encode_video_full(self, model, prepared):
        tower = self.tower(model)
        units = run_tower(tower, prepared.pixel_values.to(tower.device, tower.dtype), self.num_layers_to_run,
                          self.has_cls, with_stats=False).units  # (F, 729, C)
        pooled = model.model.apply_pooling(self.project(model, units))  # (F, 196, D)
        return torch.cat([pooled.flatten(0, 1), model.model.image_newline[None].to(pooled)])

    def video_token_map(self, model, prepared):
        """The pooling run on each patch's (row, col) instead of features: a pooled token's place is the
        patch nearest to where the bilinear pooling reads it."""
        rows, cols = self.grid
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        coords = torch.tensor(np.stack([ys, xs], -1).reshape(1, rows * cols, 2), dtype=torch.float32)
        pooled = model.model.apply_pooling(coords)[0].round().long()  # (196, 2)
        units = (pooled[:, 0].clamp(0, rows - 1) * cols + pooled[:, 1].clamp(0, cols - 1)).tolist()
        frames = len(prepared.crops)
        out = [(f, u, -1) for f in range(frames) for u in units] + [(frames - 1, -1, -1)]
        return np.array(out, dtype=np.int64).reshape(-1, 3)

    def pack(self, model, crop_features, image_size, newline):
        """(crops, N, D) -> transformers' packing: base tokens, then unpadded tiles with a newline per row."""
        packed, _ = model.model.pack_image_features([crop_features], torch.tensor([image_size]),
                                                    image_newline=newline,
                                                    vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed[0]

    @classmethod
    def arch_config(cls, vision, text, tokenizer):
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      image_grid_pinpoints=PINPOINTS)
        return config, cls.processor()

    @staticmethod
    def processor():  # llava-hf/llava-onevision-qwen2-*-ov-hf's preprocessor_config.json
        return LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=PINPOINTS,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
