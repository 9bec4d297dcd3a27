"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): CLIP ViT-L/14-336 with CLS, read at layer -2; one 336 px crop
(the centre square); Vicuna, whose chat template is "USER: <image>\\n... ASSISTANT:"."""

from dataclasses import replace

import numpy as np
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .base import Crop, Prepared
from .llava_common import LlavaStyle, run_tower

# A copy of llava-hf/llava-1.5-*-hf's chat_template.json (used when a checkpoint has none; the tiny model carries it)
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=336, projection_dim=768)
VICUNA_7B = dict(max_position_embeddings=4096,
                 hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, rms_norm_eps=1e-5)
VICUNA_13B = dict(max_position_embeddings=4096,
                 hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064, rms_norm_eps=1e-5)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class Llava(LlavaStyle):
    name = "llava"
    model_type = "llava"
    model_class = LlavaForConditionalGeneration
    image_processor_class = CLIPImageProcessorPil  # the PIL backend: no torchvision needed
    has_cls = True
    clip_text_source = "openai/clip-vit-large-patch14-336"  # CLIP ViT-L/14-336, whole (text tower, projections)
    chat_template = TEMPLATE
    stop_strings = ("</s>",)
    presets = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"}
    sgl_pairs = {"llava-1.5-13b": "llava-1.5-7b"}
    tiny = {"tiny-llava": dict(vision_layers=4, text_hidden=64, text_layers=2, text_heads=4),
            "tiny-llava-h32": dict(vision_layers=4, text_hidden=64, text_layers=2, text_heads=2)}  # head size 32: vLLM's CPU kernels
    tiny_vision = dict(image_size=336, projection_dim=64, initializer_factor=4.0)
    arch = {"llava-1.5-7b-arch": (CLIP_L_336, VICUNA_7B), "llava-1.5-13b-arch": (CLIP_L_336, VICUNA_13B)}
    tiny_special_tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")

    def layout(self, image, max_tiles=None) -> Prepared:  # one crop: nothing to cap
        w, h = image.size
        if self.image_option("do_center_crop"):  # shortest edge -> side, then a centred square
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        elif self.image_option("do_pad"):  # padded to a square: the square extends past the image
            s = max(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        else:  # squashed to a square
            box = (0, 0, w, h)
        return Prepared(None, [Crop(box, self.grid)], (h, w))

    def prepare(self, image, max_tiles=None) -> Prepared:
        pixels = self.preprocess(image)["pixel_values"]  # (1, 3, 336, 336)
        return replace(self.layout(image), pixel_values=pixels)

    def encode_full(self, model, prepared):
        """Every patch through the projector; the "default" strategy drops CLS, as transformers does."""
        tower = self.tower(model)
        features = run_tower(tower, prepared.pixel_values.to(tower.device, tower.dtype), self.num_layers_to_run,
                             self.has_cls, with_stats=False).units
        features = self.project(model, features)[0]  # (1 + N, D)
        return features[1:] if self.config.vision_feature_select_strategy == "default" else features

    def full_token_map(self, model, prepared):
        rows, cols = prepared.crops[0].grid
        return np.array([(0, p, -1) for p in range(rows * cols)], dtype=np.int64).reshape(-1, 3)

    @classmethod
    def arch_config(cls, vision, text, tokenizer):
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        return config, cls.processor()

    @staticmethod
    def processor():  # llava-hf/llava-1.5-*-hf's preprocessor_config.json (CLIPImageProcessor)
        return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     do_center_crop=True, do_convert_rgb=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
