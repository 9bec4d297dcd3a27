"""Tiny random-weight VLMs with an offline tokenizer and image processor.

They are built once from a fixed seed, saved to a cache directory like a downloaded checkpoint,
and then loaded by `load_vlm` through exactly the same code as a real model. Their answers are
random text; their shapes (a 24x24 CLIP grid with CLS, a 27x27 SigLIP grid with anyres tiles) are
those of the real towers, so every selection, merge and heatmap is exercised for real.
"""

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from .templates import LLAVA_TEMPLATE, ONEVISION_TEMPLATE

TINY_VERSION = 2  # bump when a tiny model's recipe changes, so caches are rebuilt
SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# The real LLaVA-OneVision grid pinpoints (1x1 .. 6x6 tiles of 384 px).
OV_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT: system user
assistant What is in the image? Describe the picture. What colour is the cat? How many people are
there? The image shows a cat sitting on a table next to a cup of coffee. A rocket stands on the
launch pad under a blue sky. An astronaut in a white suit poses in front of a flag. A man rides a
red motorcycle on a road. The photograph is bright, with green trees, a river and mountains.
Yes. No. It is red, blue, green, yellow, black, white, orange and brown. one two three four five.
""" * 4

TINY_SPECS = {
    # CLIP-L/336 layout (24x24 patches + CLS), feature layer -2, a small Llama.
    "tiny-llava": dict(family="llava", vision_layers=4, text_hidden=64, text_layers=2, text_heads=4),
    # SigLIP-384 layout (27x27, no CLS, anyres tiles), feature layer -1, small and larger Qwen2.
    "tiny-ov-small": dict(family="llava_onevision", vision_layers=3, text_hidden=64, text_layers=2, text_heads=4),
    "tiny-ov-large": dict(family="llava_onevision", vision_layers=3, text_hidden=128, text_layers=4, text_heads=8),
}


def tiny_cache_dir() -> Path:
    root = os.environ.get("ZIPCHAT_CACHE", Path.home() / ".cache" / "zipchat")
    return Path(root) / f"tiny-v{TINY_VERSION}"


def ensure_tiny_model(name: str) -> Path:
    """Build `name` once into the cache directory and return that directory."""
    path = tiny_cache_dir() / name
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    spec = TINY_SPECS[name]
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer = _build_tokenizer(spec["family"])
    model, image_processor = _build_model(spec, tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    if not path.exists():
        tmp.rename(path)  # atomic: a half-written model is never seen by another process
    return path


def _build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    if family == "llava":  # Llama's tokenizer starts every sequence with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    else:
        specials = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    tokenizer.chat_template = LLAVA_TEMPLATE if family == "llava" else ONEVISION_TEMPLATE  # the real checkpoints'
    return tokenizer


def _build_model(spec: dict, tokenizer):
    vocab = (len(tokenizer) + 63) // 64 * 64
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(
        vocab_size=vocab,
        hidden_size=spec["text_hidden"],
        intermediate_size=spec["text_hidden"] * 3,
        num_hidden_layers=spec["text_layers"],
        num_attention_heads=spec["text_heads"],
        num_key_value_heads=spec["text_heads"] // 2,
        max_position_embeddings=32768,
        initializer_range=0.5,  # peaked random logits: greedy decoding is not decided by rounding
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=spec["vision_layers"],
                  num_attention_heads=4, patch_size=14)
    torch.manual_seed(SEED)
    if spec["family"] == "llava":
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(image_size=336, projection_dim=64, initializer_factor=4.0, **vision),
            text_config=LlamaConfig(**text),
            image_token_index=image_token,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            do_center_crop=True, do_convert_rgb=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        )
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(image_size=384, vision_use_head=False, **vision),
            text_config=Qwen2Config(**text),
            image_token_index=image_token,
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=OV_PINPOINTS,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
        processor = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384}, image_grid_pinpoints=OV_PINPOINTS,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
        )
    return model.eval(), processor
