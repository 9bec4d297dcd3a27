"""LLaVA-NeXT (llava-hf/llava-v1.6-vicuna-*-hf): CLIP ViT-L/14-336 with CLS, read at layer -2; the base
image plus anyres tiles (2x2, 1x2, 2x1, 1x3, 3x1 of 336 px); Vicuna with the LLaVA-1.5 chat template.
VisionZip works per crop as for LLaVA-1.5 (CLS counted as a dominant token); with all tokens,
transformers' own packing (CLS dropped, unpadding, a newline per row) is used unchanged."""

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil)

from .llava import CLIP_L_336, CLIP_MEAN, CLIP_STD, TEMPLATE, VICUNA_7B, VICUNA_13B, Llava
from .llava_common import AnyresStyle

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's image_grid_pinpoints


class LlavaNext(AnyresStyle):
    name = "llava_next"
    model_type = "llava_next"
    model_class = LlavaNextForConditionalGeneration
    image_processor_class = LlavaNextImageProcessorPil  # the PIL backend: no torchvision needed
    # LlavaNextProcessor sets do_pad (it pads a batch to one tile count: one image is unchanged)
    has_cls = True
    clip_text_source = "openai/clip-vit-large-patch14-336"  # CLIP ViT-L/14-336, whole (text tower, projections)
    chat_template = TEMPLATE  # llava-v1.6-vicuna ships the same template as llava-1.5
    stop_strings = ("</s>",)
    presets = {"llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-next-13b": "llava-hf/llava-v1.6-vicuna-13b-hf"}
    sgl_pairs = {"llava-next-13b": "llava-next-7b"}
    tiny = {"tiny-next": dict(vision_layers=4, text_hidden=64, text_layers=2, text_heads=4)}
    tiny_vision = Llava.tiny_vision
    arch = {"llava-next-7b-arch": (CLIP_L_336, VICUNA_7B), "llava-next-13b-arch": (CLIP_L_336, VICUNA_13B)}
    tiny_special_tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")

    def pack(self, model, crop_features, image_size, newline):
        """(crops, N, D), CLS already dropped -> transformers' packing: base tokens, then unpadded tiles
        with a newline per row."""
        packed, _ = model.model.pack_image_features([crop_features], torch.tensor([image_size]),
                                                    self.config.vision_feature_select_strategy, image_newline=newline)
        return packed[0]

    @classmethod
    def arch_config(cls, vision, text, tokenizer):
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                 image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
        return config, cls.processor()

    @staticmethod
    def processor():  # llava-hf/llava-v1.6-vicuna-*-hf's preprocessor_config.json; do_pad left to the Processor's
        # default (whether the checkpoints write it is a guess: LlavaNextProcessor sets it either way)
        return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                          image_grid_pinpoints=PINPOINTS, do_center_crop=True,
                                          image_mean=CLIP_MEAN, image_std=CLIP_STD)
