"""What LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision share: a CLIP or SigLIP tower read at its feature
layer, a two-layer projector, and (NeXT, OneVision) anyres tiling.

The tower runs with its own (SDPA) attention up to the feature layer and no further. A forward
pre-hook captures that layer's input; from it we compute only what VisionZip uses (the CLS
attention row, or the mean attention each token receives) and the keys. No layer materialises its
attention matrix.
"""

from dataclasses import replace

import numpy as np
import torch
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

from ..errors import ModelUnavailable
from .base import Crop, Family, Prepared, VisionOutput, distinct_crops, feature_layer_index


def tower_body(vision_tower):
    """The module holding embeddings/encoder: older transformers nest it under `.vision_model`."""
    return getattr(vision_tower, "vision_model", vision_tower)


def encoder_layers(vision_tower):
    return tower_body(vision_tower).encoder.layers


def run_tower(vision_tower, pixel_values, num_layers: int, has_cls: bool, with_stats: bool,
              crop_chunk: int = 4, received_at: tuple = ()) -> VisionOutput:
    """pixel_values (crops, 3, S, S) -> hidden_states[num_layers] and, optionally, scores/keys and the global
    attention received at the layers `received_at`."""
    body = tower_body(vision_tower)
    layers = encoder_layers(vision_tower)
    captured = {}

    def capture(index):
        def capture_input(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
        return capture_input

    wanted = {num_layers - 1, *received_at} if with_stats else set()
    hooks = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(wanted)]
    try:
        h = body.embeddings(pixel_values)  # (crops, T, C)
        if hasattr(body, "pre_layrnorm"):  # CLIP normalises the embeddings first
            h = body.pre_layrnorm(h)
        for layer in layers[:num_layers]:
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
    finally:
        for hook in hooks:
            hook.remove()
    if not with_stats:
        return VisionOutput(units=h)
    feature = num_layers - 1
    scores, keys, at_feature = [], [], []
    for x in captured[feature].split(crop_chunk):  # bound the (H, T, T) attention memory for many crops
        s, k, g = attention_statistics(layers[feature], x, has_cls, received=feature in received_at)
        scores.append(s)
        keys.append(k)
        at_feature.append(g)
    received = {i: torch.cat([attention_statistics(layers[i], x, has_cls=False)[0]
                              for x in captured[i].split(crop_chunk)]) for i in received_at if i != feature}
    if feature in received_at:  # (the feature layer's: from the same probabilities as VisionZip's statistic)
        received[feature] = torch.cat(at_feature)
    return VisionOutput(units=h, scores=torch.cat(scores), keys=torch.cat(keys), received=received)


def attention_statistics(layer, x: torch.Tensor, has_cls: bool, received: bool = False):
    """Layer input x (B, T, C) -> (scores (B, T), keys averaged over heads (B, T, d)), and with `received`
    also the global attention (B, T) from the same probabilities (else None).

    With CLS: score(j) = sum over heads of softmax(q_CLS . k_j / sqrt(d)).
    Without:  score(j) = mean over heads and queries i of softmax(q_i . k_j / sqrt(d)) (also HiPrune's global
    attention, CLS among the queries where the tower has it).
    """
    attn = layer.self_attn
    B, T, _ = x.shape
    x = layer.layer_norm1(x)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
    rows = x[:, :1] if has_cls and not received else x  # the CLS row alone, unless every row is wanted
    q = attn.q_proj(rows).view(B, rows.shape[1], -1, attn.head_dim).transpose(1, 2)  # (B, H, T or 1, d)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (B, H, T or 1, T)
    scores = probs[:, :, 0].sum(dim=1) if has_cls else probs.mean(dim=(1, 2))  # (B, T)
    mean = (probs.mean(dim=(1, 2)) if has_cls else scores) if received else None
    return scores, k.mean(dim=1), mean  # keys: (B, T, d)


class LlavaStyle(Family):
    """A CLIP/SigLIP tower at `vision_feature_layer`, then `multi_modal_projector`."""

    def __init__(self, config, image_processor, tokenizer):
        super().__init__(config, image_processor, tokenizer)
        vc = config.vision_config
        self.side = vc.image_size
        self.grid = (vc.image_size // vc.patch_size,) * 2
        if not isinstance(config.vision_feature_layer, int):
            raise ModelUnavailable("Models that concatenate several vision feature layers are not supported.")
        self.num_layers_to_run = feature_layer_index(config.vision_feature_layer, vc.num_hidden_layers)

    @property
    def units_per_crop(self) -> int:
        return self.grid[0] * self.grid[1] + self.has_cls

    @property
    def unit_pixels(self) -> float:
        return self.side / self.grid[0]  # the patch size, or a little more (SigLIP: 384 px hold 27 patches of 14)

    def tower(self, model):
        return model.model.vision_tower

    def tower_layers(self, model):
        return encoder_layers(self.tower(model))

    def encode(self, model, prepared, with_stats, received_at=()):
        tower = self.tower(model)
        pixels = prepared.pixel_values.to(tower.device, tower.dtype)
        return run_tower(tower, pixels, self.num_layers_to_run, self.has_cls, with_stats, received_at=received_at)

    def project(self, model, units):
        return model.model.multi_modal_projector(units)

    def project_parts(self, model):
        p = model.model.multi_modal_projector  # linear_1 -> act -> linear_2
        return (lambda units: p.act(p.linear_1(units))), p.linear_2


class AnyresStyle(LlavaStyle):
    """LLaVA-NeXT and LLaVA-OneVision: a base image plus anyres tiles; `pack` is each one's packing."""
    tiles = True

    def layout(self, image, max_tiles=None) -> Prepared:
        w, h = image.size
        pinpoints = capped_pinpoints(self.config.image_grid_pinpoints, self.side, max_tiles)
        crops, tile_grid = anyres_crops((h, w), pinpoints, self.side, self.grid)
        return Prepared(None, crops, (h, w), tile_grid)

    def prepare(self, image, max_tiles=None) -> Prepared:
        layout = self.layout(image, max_tiles)
        pinpoints = capped_pinpoints(self.config.image_grid_pinpoints, self.side, max_tiles)
        out = self.preprocess(image, image_grid_pinpoints=pinpoints)
        return replace(layout, pixel_values=out["pixel_values"][0][: len(layout.crops)])  # (1 + tiles, 3, S, S)

    def pack(self, model, crop_features, image_size, newline):
        """(crops, N, D) projected features -> transformers' packing of one image (N, D)."""
        raise NotImplementedError

    def encode_full(self, model, prepared):
        tower = self.tower(model)
        keep, inverse = distinct_crops(prepared.pixel_values)  # a small square: base image = its one tile
        features = run_tower(tower, prepared.pixel_values[keep].to(tower.device, tower.dtype), self.num_layers_to_run,
                             self.has_cls, with_stats=False).units[torch.tensor(inverse)]
        if self.config.vision_feature_select_strategy == "default":  # NeXT drops CLS, as transformers does
            features = features[:, 1:]
        return self.pack(model, self.project(model, features), prepared.image_size, model.model.image_newline)

    def full_token_map(self, model, prepared):
        return anyres_token_map(lambda feats, newline: self.pack(model, feats, prepared.image_size, newline), prepared)


def capped_pinpoints(pinpoints, side: int, max_tiles: int | None) -> list:
    """The anyres resolutions with at most `max_tiles` tiles (a single tile is always allowed)."""
    if not max_tiles:
        return pinpoints
    kept = [p for p in pinpoints if (p[0] // side) * (p[1] // side) <= max_tiles]
    return kept if [side, side] in kept else [[side, side]] + kept


def anyres_crops(image_size: tuple, pinpoints, side: int, grid: tuple):
    """LLaVA's anyres tiling (NeXT, OneVision): the base image squashed to one crop, then the image
    resized to fit the best pinpoint resolution, centred with padding, and cut into side x side
    tiles. -> (crops with their boxes on the original image, (rows, cols) of tiles)."""
    h, w = image_size
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    rows, cols = best_h // side, best_w // side
    new_h, new_w = get_patch_output_size(np.zeros((1, h, w)), (best_h, best_w), input_data_format="channels_first")
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    sy, sx = new_h / h, new_w / w
    crops = [Crop((0, 0, w, h), grid)]
    for r in range(rows):
        for c in range(cols):
            x0, y0 = (c * side - pad_x) / sx, (r * side - pad_y) / sy
            crops.append(Crop((x0, y0, x0 + side / sx, y0 + side / sy), grid))
    return crops, (rows, cols)


def anyres_token_map(pack, prepared: Prepared) -> np.ndarray:
    """(crop, unit, -1) of every token of an anyres image as the family's packing orders them
    (unpadding, a newline per row, pooling): `pack` runs transformers' own packing on coordinate
    features (is_base, y, x) instead of real ones, so the map follows it exactly."""
    rows, cols = prepared.crops[0].grid
    n_crops = len(prepared.crops)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = [np.stack([np.ones_like(ys), ys, xs], -1)]
    t_rows, t_cols = prepared.tile_grid
    for k in range(n_crops - 1):
        tr, tc = divmod(k, t_cols)
        coords.append(np.stack([np.zeros_like(ys), ys + tr * rows, xs + tc * cols], -1))
    feats = torch.tensor(np.stack(coords).reshape(n_crops, rows * cols, 3), dtype=torch.float32)
    packed = pack(feats, torch.full((3,), -1.0))
    out = []
    for is_base, y, x in packed.round().long().tolist():
        if is_base < 0:
            out.append((0, -1, -1))  # newline token
        elif is_base == 1:
            out.append((0, y * cols + x, -1))
        else:
            out.append((1 + (y // rows) * t_cols + x // cols, (y % rows) * cols + x % cols, -1))
    return np.array(out, dtype=np.int64).reshape(-1, 3)
