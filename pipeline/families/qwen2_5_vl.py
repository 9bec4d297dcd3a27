"""Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct): a ViT at the image's own resolution (patches of 14 px, the
image resized to multiples of 28), window attention in most blocks and full attention in
`fullatt_block_indexes` (the last block among them), a 2x2 patch merger before the LLM, and 3-D
M-RoPE positions (t, h, w) for image tokens.

VisionZip selects merged units. The tower runs with its own (SDPA/flash) attention in every block but
the last (a full-attention block), whose attention module gets, for the duration of the encode and on
this instance only, a forward that computes the same output in query chunks and, from the same
probabilities, that block's statistic over the image's own patches: score(j) = mean over heads and
queries of attention[i -> j] (no full matrix), and its keys after the rotary embedding, averaged over
heads. One attention computation, not two: the encode costs what the plain tower costs (bench row 13). The window ordering is undone with transformers' own window index; a
unit's score and key are the means over its 4 patches, its features the 4 patches' concatenation (what
the merger reads). The budget is a share of the image's units (54+10 per 576 by default), at least one
dominant. Kept units go to the LLM in index order and keep the M-RoPE positions they have without
compression (a contextual token its target's); text after an image keeps its uncompressed positions.

A clip: frames in pairs (the temporal patch), each pair one grid of units and one crop, at M-RoPE positions whose
first row counts time (tokens_per_second x seconds a pair covers); see the video section below.
"""

import importlib
from dataclasses import replace

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from ..errors import InputError
from ..video import MAX_FRAMES, check_frames, qwen_indices, resized
from .base import CPU_FRAMES, Crop, Family, Prepared, VisionOutput, _Sized

# A copy of Qwen/Qwen2.5-VL-*-Instruct's chat template
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
REFERENCE_UNITS = 576  # a budget of 54 + 10 means 64 units per 576 of the image's (VisionZip's LLaVA setting)
MAX_ASPECT = 200  # the processor's own limit
VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TEXT = dict(vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
TEXT_3B = dict(TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True)
TEXT_7B = dict(TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4)


TILE_AREA = 448 * 448  # what the tile cap counts per tile (see prepare)


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    image_processor_class = Qwen2VLImageProcessorPil  # the PIL backend: no torchvision needed
    has_cls = False
    chat_template = TEMPLATE
    stop_strings = ("<|im_end|>", "<|endoftext|>")
    position_rows = 3
    keeps_index_order = True
    tiles = True  # no tiles, but the tile cap limits the area (see prepare)
    tile_cap_label = "image area VisionZip encodes, in 448 px tiles beyond the first"
    presets = {"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}
    sgl_pairs = {"qwen2.5-vl-7b": "qwen2.5-vl-3b", "tiny-qwen-large": "tiny-qwen-small"}
    tiny = {"tiny-qwen-small": dict(vision_layers=4, text_hidden=64, text_layers=2, text_heads=4),
            "tiny-qwen-large": dict(vision_layers=4, text_hidden=128, text_layers=4, text_heads=8)}
    arch = {"qwen2.5-vl-3b-arch": (VIT, TEXT_3B), "qwen2.5-vl-7b-arch": (VIT, TEXT_7B)}
    tiny_special_tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tiny_extra_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

    def __init__(self, config, image_processor, tokenizer):
        super().__init__(config, image_processor, tokenizer)
        self.merge = config.vision_config.spatial_merge_size
        self.num_layers_to_run = config.vision_config.depth  # its feature layer is the last block

    @property
    def units_per_crop(self) -> int:
        return REFERENCE_UNITS  # budgets are shares of this many units

    @property
    def unit_pixels(self) -> float:
        return self.image_processor.patch_size * self.merge  # 28

    def budget(self, dominant, contextual, units):
        keep = min(units, max(1, round(units * (dominant + contextual) / REFERENCE_UNITS)))
        kept_dominant = min(keep, max(1, round(keep * dominant / (dominant + contextual))))
        return kept_dominant, keep - kept_dominant

    def tower(self, model):
        return model.model.visual

    def tower_layers(self, model):
        return self.tower(model).blocks

    def pixel_range(self, max_tiles=None) -> dict:
        """The processor's `size` (min and max pixels of the resized image). No tiles here: `max_tiles`
        caps the image's area at that of 1 + max_tiles tiles of 448 px (256 units each; the CPU default
        4 gives 1,280 units, transformers' own default `max_pixels`)."""
        size = self.image_processor.size
        most = size.longest_edge if not max_tiles else min(size.longest_edge, (1 + max_tiles) * TILE_AREA)
        return {"shortest_edge": size.shortest_edge, "longest_edge": most}

    def layout(self, image, max_tiles=None) -> Prepared:
        """The unit grid by the processor's own resize rule (sides multiples of 28 px, area in range)."""
        w, h = image.size
        if max(w, h) / min(w, h) > MAX_ASPECT:
            raise InputError(f"This image is {w}x{h}: Qwen2.5-VL reads images up to {MAX_ASPECT}:1. "
                             "Please crop it to a less extreme shape.")
        ip, size = self.image_processor, self.pixel_range(max_tiles)
        smart_resize = importlib.import_module(type(ip).__module__).smart_resize
        unit = ip.patch_size * ip.merge_size
        rows, cols = smart_resize(h, w, factor=unit, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return Prepared(None, [Crop((0, 0, w, h), (rows // unit, cols // unit))], (h, w))

    def prepare(self, image, max_tiles=None) -> Prepared:
        layout = self.layout(image, max_tiles)
        out = self.preprocess(image, size=self.pixel_range(max_tiles))
        grid_thw = out["image_grid_thw"]  # (1, 3): frames, rows and columns of 14 px patches
        return replace(layout, pixel_values=out["pixel_values"], extra={"grid_thw": grid_thw})

    def window_index(self, visual, grid_thw) -> torch.Tensor:
        """(units,) the window ordering of the merged units, as transformers computes it."""
        if hasattr(visual, "get_window_index"):  # transformers versions with it as a method
            return visual.get_window_index(grid_thw)[0]
        from transformers.vision_utils import get_vision_window_index
        c = visual.config
        return get_vision_window_index(grid_thw, c.spatial_merge_size, c.window_size, c.patch_size)[0]

    def encode(self, model, prepared, with_stats, received_at=()):
        visual = self.tower(model)
        grid_thw = prepared.extra["grid_thw"].to(visual.device)
        last = visual.blocks[-1]
        captured = {}
        hook = last.register_forward_hook(lambda m, args, out: captured.__setitem__("out", out))
        others = {i: {} for i in received_at if i != len(visual.blocks) - 1} if with_stats else {}
        if with_stats:  # this instance's last attention computes the statistic with its output
            last.attn.forward = attention_with_statistics(last.attn, captured)
            for i, into in others.items():  # (HiPrune's object layer: the same, within that block's windows)
                visual.blocks[i].attn.forward = attention_with_statistics(visual.blocks[i].attn, into)
        try:
            visual(prepared.pixel_values.to(visual.device, visual.dtype), grid_thw=grid_thw)
        finally:
            hook.remove()
            for block in (last, *(visual.blocks[i] for i in others)):
                block.attn.__dict__.pop("forward", None)
        unit = self.merge ** 2
        natural = torch.argsort(self.window_index(visual, grid_thw).to(visual.device))  # window order -> index order
        out = captured["out"]  # (patches, C) in window order, 4 consecutive patches per unit
        groups = int(grid_thw[0, 0])  # temporal groups: 1 for an image, one crop each for a clip
        units = out.view(-1, unit, out.shape[-1])[natural].flatten(1).view(groups, -1, unit * out.shape[-1])  # (T, U, 4C)
        if not with_stats:
            return VisionOutput(units=units)
        per_unit = lambda x: x.view(-1, unit, *x.shape[1:]).mean(1)[natural].view(groups, -1, *x.shape[1:])  # noqa: E731
        scores = per_unit(captured["received"])  # (T, U): the full-attention block attends within each group
        received = {i: per_unit(others[i]["received"]) if i in others else scores for i in received_at}
        return VisionOutput(units=units, scores=scores, keys=per_unit(captured["keys"]), received=received)

    def project(self, model, units):
        """The merger: each patch of a unit normalised, then the MLP on the concatenation."""
        merger = self.tower(model).merger
        c = units.shape[-1] // self.merge ** 2
        return merger.mlp(merger.ln_q(units.reshape(*units.shape[:-1], self.merge ** 2, c)).flatten(-2))

    def project_parts(self, model):
        merger = self.tower(model).merger  # ln_q per patch -> mlp: Linear, GELU, Linear
        mlp = merger.mlp

        def inner(units):
            c = units.shape[-1] // self.merge ** 2
            return mlp[1](mlp[0](merger.ln_q(units.reshape(*units.shape[:-1], self.merge ** 2, c)).flatten(-2)))
        return inner, mlp[2]

    def encode_full(self, model, prepared, features_of=None):
        """transformers' own features (get_image_features; a clip: `features_of`, get_video_features)."""
        visual = self.tower(model)
        out = (features_of or model.model.get_image_features)(prepared.pixel_values.to(visual.device, visual.dtype),
                                                              prepared.extra["grid_thw"].to(visual.device))
        features = getattr(out, "pooler_output", out)
        return features[0] if isinstance(features, (list, tuple)) else features

    def full_token_map(self, model, prepared):
        rows, cols = prepared.crops[0].grid
        return np.array([(0, u, -1) for u in range(rows * cols)], dtype=np.int64).reshape(-1, 3)

    # video: the checkpoints ship one preprocessor_config.json, which transformers' Qwen2VLVideoProcessor reads too
    # (min_pixels 3136, max_pixels 12845056; CLIP mean and std; bicubic): each frame resized by smart_resize like an
    # image, the frames in pairs (temporal patch 2; an odd last frame repeated), each pair one grid of units; 2
    # frames a second (at most video.MAX_FRAMES) on a GPU. A temporal group is one crop here: VisionZip keeps its
    # share of each group's units.
    takes_video = True
    frames_per_crop = 2
    video_fps = 2.0

    def video_sample(self, num_frames, on_gpu):
        if num_frames is None and on_gpu:
            return None, lambda info: qwen_indices(info, fps=self.video_fps, max_frames=MAX_FRAMES)
        n = check_frames(CPU_FRAMES if num_frames is None else num_frames)
        return None, lambda info: qwen_indices(info, num_frames=n)

    def video_frame_size(self, shown, max_tiles=None):
        rows, cols = self.layout(_Sized(shown), max_tiles).crops[0].grid
        return cols * self.unit_pixels, rows * self.unit_pixels

    def prepare_video(self, frames, max_tiles=None):
        """The video processor's patches, from frames rescaled and normalised as the image processor's PIL backend
        does (a clip of one repeated frame gives that image's pixel_values exactly); `max_tiles` caps each frame's
        area as it caps an image's."""
        w, h = self.video_frame_size(frames.shown, max_tiles)
        ip, tp, m = self.image_processor, self.config.vision_config.temporal_patch_size, self.merge
        p = ip.patch_size  # 14
        x = (torch.from_numpy(resized(frames.pixels, (w, h))).permute(0, 3, 1, 2).double() * ip.rescale_factor).float()
        mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (ip.image_mean, ip.image_std))
        x = (x - mean) / std  # (F, 3, h, w)
        if len(x) % tp:  # the processor's padding: the last frame repeated
            x = torch.cat([x, x[-1:].expand(tp - len(x) % tp, -1, -1, -1)])
        gt, gh, gw = len(x) // tp, h // p, w // p
        patches = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        crop = Crop((0, 0, *frames.shown), (gh // m, gw // m))
        return Prepared(patches.reshape(gt * gh * gw, 3 * tp * p * p), [crop] * gt, (frames.shown[1], frames.shown[0]),
                        (1, gt), extra={"video": True, "grid_thw": torch.tensor([[gt, gh, gw]]),
                                        "times": tuple(frames.times[::tp]), "frames_per_crop": tp,
                                        "seconds_per_crop": tp / (frames.sampled_fps or self.video_fps)})

    def encode_video_full(self, model, prepared):
        return self.encode_full(model, prepared, model.model.get_video_features)

    def video_token_map(self, model, prepared):
        rows, cols = prepared.crops[0].grid
        return np.array([(t, u, -1) for t in range(len(prepared.crops)) for u in range(rows * cols)],
                        dtype=np.int64).reshape(-1, 3)

    def positions(self, ids, slots):
        """(3, L) M-RoPE positions (t, h, w): a text token at the running index on all three; an image's
        tokens at (p, p + row, p + col) of the unit they carry (a contextual token: its target); a clip's at
        (p + floor(crop x interval), p + row, p + col), interval = tokens_per_second x seconds a temporal group
        covers (its get_rope_index). Text after an image or clip goes on at the largest position of its whole grid
        + 1 (Qwen's own rule, and vLLM's), as without compression."""
        pos = torch.empty(3, len(ids), dtype=torch.long)
        p = 0
        for slot in slots:
            comp = slot.compression
            if comp is None:
                pos[:, slot.start] = p
                p += 1
                continue
            rows, cols = comp.crops[0].grid
            r, c = np.divmod(comp.token_map[:, 1], cols)
            step = self.time_interval(comp)
            time = np.floor(np.arange(len(comp.crops)) * step).astype(np.int64)  # (crops,) time position of each
            pos[0, slot.start:slot.end] = torch.from_numpy(p + time[comp.token_map[:, 0]])
            pos[1, slot.start:slot.end] = torch.from_numpy(p + r)
            pos[2, slot.start:slot.end] = torch.from_numpy(p + c)
            p += max(int(time[-1]) + 1, rows, cols)
        return pos

    def time_interval(self, comp) -> float:
        """Time positions from one temporal group to the next (0 for an image)."""
        if comp.seconds_per_crop is None:
            return 0.0
        return getattr(self.config.vision_config, "tokens_per_second", 2) * comp.seconds_per_crop

    def position_ids(self, positions):
        return positions[:, None, :]  # (3, batch 1, n)

    def rotary(self, attention_module):
        module = importlib.import_module(type(attention_module).__module__)
        multimodal = getattr(module, "apply_multimodal_rotary_pos_emb", None)
        text = self.config.text_config
        section = (getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}).get("mrope_section")

        def rotate(q, k, cos, sin):
            if cos.dim() == 4 and multimodal is not None:  # (3, B, L, d): sections are split in the attention
                return multimodal(q, k, cos, sin, section)
            return module.apply_rotary_pos_emb(q, k, cos, sin)  # sections already merged by the rotary embedding
        return rotate

    @classmethod
    def tiny_model(cls, spec, tokenizer, text, vision):
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                           "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]})
        vision = dict(depth=spec["vision_layers"], hidden_size=vision["hidden_size"],
                      intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                      out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[1, spec["vision_layers"] - 1], initializer_range=0.3,
                      tokens_per_second=2)
        return cls.model_class(cls.config_for(vision, text, tokenizer)), cls.processor()

    @classmethod
    def arch_config(cls, vision, text, tokenizer):
        return cls.config_for(dict(vision, out_hidden_size=text["hidden_size"]), text, tokenizer), cls.processor()

    @staticmethod
    def config_for(vision, text, tokenizer):
        tid = tokenizer.convert_tokens_to_ids
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
                                video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                                vision_end_token_id=tid("<|vision_end|>"),
                                tie_word_embeddings=text.get("tie_word_embeddings", False))

    @staticmethod
    def processor():  # Qwen2.5-VL-Instruct's preprocessor_config.json
        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)


def attention_with_statistics(attn, captured: dict):
    """A forward for one vision attention module (set on that instance during an encode, then removed):
    the output transformers' forward gives (softmax attention within each image's span, then `proj`),
    computed in query chunks so that the same probabilities also give VisionZip's statistic. Stores
    `received` (N,): mean over heads and queries of the attention each patch receives, and `keys` (N, d):
    the keys after the rotary embedding, averaged over heads. One attention computation, not two."""
    rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision

    def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        n = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, d)
        q, k = rotate(q, k, *position_embeddings)
        out, received = span_attention(q, k, v, cu_seqlens.tolist(), attn.scaling)
        captured.update(received=received, keys=k.mean(dim=1))
        return attn.proj(out.reshape(n, -1).to(hidden_states.dtype))
    return forward


def span_attention(q, k, v, bounds: list, scale: float, chunk: int = 128):
    """q, k, v (N, H, d); attention within each span [bounds[i], bounds[i+1]) (one per image), in float32
    and in chunks of queries (at most 256 MB of logits at a time) -> (output (N, H, d), received (N,))."""
    n, heads, _ = q.shape
    qh = q.float().transpose(0, 1) * scale  # (H, N, d)
    kt = k.float().permute(1, 2, 0).contiguous()  # (H, d, N)
    vh = v.float().transpose(0, 1)  # (H, N, d)
    out = torch.empty_like(qh)
    received = torch.zeros(n, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = max(1, min(chunk, (1 << 26) // (heads * (b - a))))
        for s in range(a, b, rows):
            t = min(b, s + rows)
            e = qh[:, s:t] @ kt[:, :, a:b]  # (H, c, span) logits
            e -= e.amax(-1, keepdim=True)
            e.exp_()  # in place: one (H, c, span) buffer per chunk
            inverse_sum = e.sum(-1, keepdim=True).reciprocal_()  # (H, c, 1): the softmax's normaliser
            out[:, s:t] = (e @ vh[:, a:b]) * inverse_sum
            received[a:b] += (inverse_sum.transpose(-1, -2) @ e).sum(0)[0]  # softmax summed over queries and heads
        received[a:b] /= heads * (b - a)
    return out.transpose(0, 1), received
