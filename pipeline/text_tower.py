"""CLIP's text tower beside a LLaVA checkpoint: the image-text space CDPruner measures a question's relevance in.

LLaVA-1.5's and LLaVA-NeXT's vision tower is cut from CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336);
the llava-hf checkpoints keep the vision encoder but not CLIP's text encoder nor its two projections. CDPruner's
authors load them from that CLIP checkpoint (their clip_encoder.py: CLIPTextModelWithProjection and
CLIPVisionModelWithProjection's visual_projection); so does zipchat, once per loaded model, at the first
question-conditioned selection. Tiny twins get a seeded tiny CLIP checkpoint built like the tiny VLMs (saved,
then loaded through the same code); architecture presets get CLIP-L/336's text shapes with random weights.
"""

import os
import shutil
import threading
from pathlib import Path

import torch
from tokenizers import processors
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from .errors import InputError, ModelUnavailable

CLIP_L_336_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77)  # openai/clip-vit-large-patch14-336's text_config
CLIP_L_336_PROJECTION = 768
_LOCK = threading.Lock()  # (one load per model, however many sessions ask at once)


class ClipText:
    """CLIP's text encoder with its text projection, and the visual projection of its image tower (float32)."""

    def __init__(self, model: CLIPModel, tokenizer, device):
        self.tokenizer = tokenizer
        self.text_model = model.text_model.float().to(device).eval()
        self.text_projection = model.text_projection.float().to(device).eval()
        self.visual_projection = model.visual_projection.float().to(device).eval()
        self.positions = model.config.text_config.max_position_embeddings  # 77
        self.device = device

    @torch.inference_mode()
    def text_embeds(self, text: str) -> torch.Tensor:
        """A question -> (S, E) projected text embeddings, one per stretch of 77 tokens, as the authors cut a long
        question: the tokens padded with id 0 (masked) to a multiple of 77 and split into rows. (A question of one
        row is not padded: CLIP's text attention is causal, so padding after it changes nothing it pools.)"""
        inputs = self.tokenizer(text=[text], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        rows = (length - 1) // self.positions + 1
        pad = rows * self.positions - length if rows > 1 else 0
        inputs = {k: torch.cat([v, v.new_zeros((1, pad))], dim=1).reshape(rows, -1).to(self.device)
                  for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        pooled = self.text_model(**inputs).pooler_output  # (S, hidden): at each row's end-of-text token
        return self.text_projection(pooled)  # (S, E)

    @torch.inference_mode()
    def image_embeds(self, post_layernorm, patches: torch.Tensor) -> torch.Tensor:
        """(N, C) feature-layer patch outputs -> (N, E): the tower's post-layernorm, then CLIP's visual projection
        in float32 (the authors' `visual_projection(post_layernorm(features).float())`)."""
        return self.visual_projection(post_layernorm(patches).float().to(self.device))


def clip_text(vlm) -> ClipText:
    """The CLIP text tower for `vlm` (a family with `clip_text_source`), loaded once and kept with the model."""
    with _LOCK:
        if "clip_text" not in vlm.extra:
            model, tokenizer = load(vlm)
            vlm.extra["clip_text"] = ClipText(model, tokenizer, vlm.device)
        return vlm.extra["clip_text"]


def load(vlm) -> tuple:
    """-> (CLIPModel without its vision encoder, tokenizer) for `vlm`: the tiny twin's, random CLIP-L/336 text
    shapes for an architecture preset, else the family's CLIP checkpoint (cache or hub)."""
    vision_hidden = vlm.model.config.vision_config.hidden_size
    if vlm.is_tiny and vlm.name.endswith(("-arch", "-arch-quick")):
        torch.manual_seed(0)
        config = clip_config(vision_hidden, CLIP_L_336_PROJECTION, dict(CLIP_L_336_TEXT, vocab_size=len(vlm.tokenizer),
                             eos_token_id=vlm.tokenizer.eos_token_id, bos_token_id=vlm.tokenizer.bos_token_id,
                             pad_token_id=vlm.tokenizer.pad_token_id))
        return without_vision(CLIPModel(config)), vlm.tokenizer
    source = str(ensure_tiny_clip(vision_hidden)) if vlm.is_tiny else vlm.family.clip_text_source
    try:
        from .models import hub_reachable, is_cached
        if not (Path(source).is_dir() or is_cached(source) or hub_reachable()):
            raise ModelUnavailable("not in the local Hugging Face cache and the hub cannot be reached")
        model = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ModelUnavailable) as e:
        raise InputError(f"CDPruner on {vlm.name} measures relevance with CLIP's text tower ({source}): "
                         f"{str(e).splitlines()[0]}. Download it where there is network (`hf download {source}`), "
                         "or choose another method.") from None
    return without_vision(model), tokenizer


def without_vision(model: CLIPModel) -> CLIPModel:
    del model.vision_model  # (the LLaVA checkpoint has the vision encoder; only the visual projection is used)
    return model.eval()


def clip_config(vision_hidden: int, projection: int, text: dict) -> CLIPConfig:
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                  num_attention_heads=4, image_size=28, patch_size=14)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def ensure_tiny_clip(vision_hidden: int) -> Path:
    """A seeded tiny CLIP checkpoint (text tower, projections, tokenizer) in the tiny models' cache directory,
    built once (in a temporary sibling, renamed when whole)."""
    from .tiny import SEED, build_tokenizer, tiny_cache_dir
    from .families.llava import Llava
    path = tiny_cache_dir() / f"tiny-clip-text-{vision_hidden}"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    tokenizer = build_tokenizer(Llava)  # CLIP's tokenizer ends every text with its end-of-text token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|endoftext|>", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>")),
                                                       ("<|endoftext|>", tokenizer.convert_tokens_to_ids("<|endoftext|>"))])
    tokenizer.eos_token = "<|endoftext|>"
    torch.manual_seed(SEED)
    text = dict(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPModel(clip_config(vision_hidden, 32, text)).eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not path.exists():
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
