"""Architecture presets: the real models' shapes with random weights, built from configs (no
download), for benchmarks. They use the tiny models' offline tokenizer (its ids are valid in the
real vocabularies) and image processors configured like the real ones, and go through the same
adapters as every other model.

Shapes are the published configs: CLIP ViT-L/14-336 + Vicuna-7B (llava-hf/llava-1.5-7b-hf),
SigLIP-so400m/14-384 with 26 layers used + Qwen2-0.5B / Qwen2-7B (llava-hf/llava-onevision-*-hf).
`quick=True` halves widths and depths (token counts unchanged) for a fast sanity run.
"""

import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionImageProcessorPil, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)

from .tiny import OV_PINPOINTS, ensure_tiny_model

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=336, projection_dim=768)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     patch_size=14, image_size=384, vision_use_head=False)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, rms_norm_eps=1e-5)
VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064, rms_norm_eps=1e-5)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6)

ARCH_PRESETS = {
    "llava-1.5-7b-arch": ("llava", CLIP_L_336, VICUNA_7B),
    "llava-1.5-13b-arch": ("llava", CLIP_L_336, VICUNA_13B),
    "llava-ov-0.5b-arch": ("llava_onevision", SIGLIP_SO400M, QWEN2_05B),
    "llava-ov-7b-arch": ("llava_onevision", SIGLIP_SO400M, QWEN2_7B),
}


def shrink(shape: dict) -> dict:
    """Half width and depth, same heads' width and same token counts (for --quick)."""
    out = dict(shape)
    heads = max(1, shape["num_attention_heads"] // 2)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    out.update(num_attention_heads=heads, hidden_size=heads * head_dim,
               intermediate_size=shape["intermediate_size"] // 2, num_hidden_layers=shape["num_hidden_layers"] // 2)
    if "num_key_value_heads" in shape:
        out["num_key_value_heads"] = max(1, min(heads, shape["num_key_value_heads"] // 2))
    return out


def build_arch_model(name: str, device, dtype, quick: bool = False):
    """-> (model, tokenizer, image processor) with random weights. `device="meta"` allocates nothing."""
    family, vision, text = ARCH_PRESETS[name]
    if quick:
        vision, text = shrink(vision), shrink(text)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        ensure_tiny_model("tiny-llava" if family == "llava" else "tiny-ov-small"))
    text = dict(text, max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        cls = LlavaForConditionalGeneration
        processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                          do_center_crop=True)
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINPOINTS)
        cls = LlavaOnevisionForConditionalGeneration
        processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                    image_grid_pinpoints=OV_PINPOINTS,
                                                    image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype directly (a 7B model in fp32 is 28 GB)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), tokenizer, processor
