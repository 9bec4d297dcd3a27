"""Run a CLIP/SigLIP tower up to the feature layer, and read the one attention VisionZip needs.

The layers run with the model's own (SDPA) attention. A forward pre-hook on the feature layer
captures that layer's input; from it we compute, ourselves, only the attention statistics
VisionZip uses (the CLS row, or the mean attention each token receives) and the keys. No layer
after the feature layer runs, and no layer materialises its attention matrix.
"""

from dataclasses import dataclass

import torch


@dataclass
class VisionOutput:
    features: torch.Tensor  # (crops, T, C) output of the feature layer (T = 1 + N with CLS)
    scores: torch.Tensor | None = None  # (crops, T) attention statistic per token
    keys: torch.Tensor | None = None  # (crops, T, d) keys averaged over heads (not normalised)


def vision_body(vision_tower):
    """The module holding embeddings/encoder: older transformers nest it under `.vision_model`."""
    return getattr(vision_tower, "vision_model", vision_tower)


def encoder_layers(vision_tower):
    return vision_body(vision_tower).encoder.layers


def run_vision_tower(vision_tower, pixel_values, num_layers: int, has_cls: bool, with_attention: bool,
                     crop_chunk: int = 4) -> VisionOutput:
    """pixel_values (crops, 3, S, S) -> features of hidden_states[num_layers] and, optionally, scores/keys."""
    vm = vision_body(vision_tower)
    layers = encoder_layers(vision_tower)
    captured = {}

    def capture_input(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    hook = layers[num_layers - 1].register_forward_pre_hook(capture_input, with_kwargs=True) if with_attention else None
    try:
        h = vm.embeddings(pixel_values)  # (crops, T, C)
        if hasattr(vm, "pre_layrnorm"):  # CLIP normalises the embeddings first
            h = vm.pre_layrnorm(h)
        for layer in layers[:num_layers]:
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
    finally:
        if hook is not None:
            hook.remove()
    if not with_attention:
        return VisionOutput(features=h)
    scores, keys = [], []
    for x in captured["x"].split(crop_chunk):  # bound the (H, T, T) attention memory for many crops
        s, k = attention_statistics(layers[num_layers - 1], x, has_cls)
        scores.append(s)
        keys.append(k)
    return VisionOutput(features=h, scores=torch.cat(scores), keys=torch.cat(keys))


def attention_statistics(layer, x: torch.Tensor, has_cls: bool):
    """Layer input x (B, T, C) -> (scores (B, T), keys averaged over heads (B, T, d)).

    With CLS: score(j) = sum over heads of softmax(q_CLS . k_j / sqrt(d)).
    Without:  score(j) = mean over heads and queries i of softmax(q_i . k_j / sqrt(d)).
    """
    attn = layer.self_attn
    B, T, _ = x.shape
    x = layer.layer_norm1(x)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
    if has_cls:
        q = attn.q_proj(x[:, :1]).view(B, 1, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1, d)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (B, H, 1, T)
        scores = probs.sum(dim=1)[:, 0]  # (B, T)
    else:
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (B, H, T, T)
        scores = probs.mean(dim=(1, 2))  # (B, T)
    return scores, k.mean(dim=1)  # keys: (B, T, d)
