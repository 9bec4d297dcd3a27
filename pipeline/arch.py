"""Architecture presets: the real models' shapes with random weights, built from configs (no
download), for benchmarks. Each family lists its presets and builds their configs (families/);
they use that family's tiny offline tokenizer (its ids are valid in the real vocabularies) and go
through the same code as every other model. `quick=True` halves widths and depths (token counts
unchanged) for a fast sanity run.
"""

import torch
from transformers import PreTrainedTokenizerFast

from .families import FAMILIES
from .tiny import ensure_tiny_model

ARCH_PRESETS = {name: (family, *shapes) for family in FAMILIES for name, shapes in family.arch.items()}


def shrink(shape: dict) -> dict:
    """Half width and depth, same heads' width and same token counts (for --quick). Vision configs name
    heads and depth either way (`num_attention_heads`/`num_hidden_layers`, or Qwen's `num_heads`/`depth`,
    whose full-attention blocks keep their place in the halved stack)."""
    out = dict(shape)
    heads_key = "num_attention_heads" if "num_attention_heads" in shape else "num_heads"
    depth_key = "num_hidden_layers" if "num_hidden_layers" in shape else "depth"
    heads = max(1, shape[heads_key] // 2)
    head_dim = shape["hidden_size"] // shape[heads_key]
    out.update({heads_key: heads, "hidden_size": heads * head_dim, "intermediate_size": shape["intermediate_size"] // 2,
                depth_key: shape[depth_key] // 2})
    if "num_key_value_heads" in shape:
        out["num_key_value_heads"] = max(1, min(heads, shape["num_key_value_heads"] // 2))
    if "fullatt_block_indexes" in shape:
        out["fullatt_block_indexes"] = sorted({i // 2 for i in shape["fullatt_block_indexes"]})
    return out


def build_arch_model(name: str, device, dtype, quick: bool = False):
    """-> (model, tokenizer, image processor) with random weights. `device="meta"` allocates nothing."""
    family, vision, text = ARCH_PRESETS[name]
    if quick:
        vision, text = shrink(vision), shrink(text)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ensure_tiny_model(next(iter(family.tiny))))
    text = dict(text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config, processor = family.arch_config(vision, text, tokenizer)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype directly (a 7B model in fp32 is 28 GB)
    try:
        with torch.device(device):
            model = family.model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), tokenizer, processor
