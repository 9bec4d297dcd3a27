"""Tiny random-weight VLMs with an offline tokenizer and image processor, one or two per family.

They are built once from a fixed seed, saved to a cache directory like a downloaded checkpoint,
and then loaded by `load_vlm` through exactly the same code as a real model. Their answers are
random text; their vision layouts (grids, CLS, tiling, merging) are those of the real towers, so
every selection, merge and heatmap is exercised for real. Each family defines its tiny models'
configs (families/); this module trains the shared byte-level tokenizer and saves the checkpoint.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .errors import ModelUnavailable
from .families import FAMILIES

TINY_VERSION = 4  # bump when a tiny model's recipe changes, so caches are rebuilt
SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TINY_SPECS = {name: (family, spec) for family in FAMILIES for name, spec in family.tiny.items()}

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT: system user
assistant What is in the image? Describe the picture. What colour is the cat? How many people are
there? The image shows a cat sitting on a table next to a cup of coffee. A rocket stands on the
launch pad under a blue sky. An astronaut in a white suit poses in front of a flag. A man rides a
red motorcycle on a road. The photograph is bright, with green trees, a river and mountains.
Yes. No. It is red, blue, green, yellow, black, white, orange and brown. one two three four five.
""" * 4


def tiny_cache_dir() -> Path:
    root = os.environ.get("ZIPCHAT_CACHE", Path.home() / ".cache" / "zipchat")
    return Path(root) / f"tiny-v{TINY_VERSION}"


def ensure_tiny_model(name: str) -> Path:
    """Build `name` once into the cache directory and return that directory. Where the cache cannot be
    written or entered (read-only, full, no permission), it is built in a temporary directory instead, with a message saying which
    directory failed and why; a half-written build never stays behind. Neither works: ModelUnavailable."""
    path = tiny_cache_dir() / name
    try:  # (a cache directory the app may not enter fails here already, and is treated like any other fault)
        if built(path):
            return path
        return build_tiny_model(name, path)
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"zipchat-{os.getuid()}" / f"tiny-v{TINY_VERSION}" / name
        print(f"[zipchat] Cannot write the tiny model '{name}' to {path.parent} ({reason(e)}); building it in "
              f"{fallback.parent} instead. Set ZIPCHAT_CACHE to a writable directory to keep it.", file=sys.stderr)
    try:
        if built(fallback):
            return fallback
        return build_tiny_model(name, fallback)
    except OSError as e:
        raise ModelUnavailable(f"Cannot build the tiny model '{name}': neither {path.parent} nor {fallback.parent} "
                               f"can be written ({reason(e)}). Free some disk space, or set ZIPCHAT_CACHE to a "
                               "writable directory.") from None


def built(path: Path) -> bool:
    """Whether a whole tiny model is at `path` (OSError where the directory cannot be looked into)."""
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def build_tiny_model(name: str, path: Path) -> Path:
    """Build `name` into `path` (written in a temporary sibling, renamed when whole). Any failure to write
    (no space, read-only, a file in the way) is an OSError, and the partial directory is removed."""
    family, spec = TINY_SPECS[name]
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_model(family, spec, tmp)
        if not path.exists():
            tmp.rename(path)  # atomic: a half-written model is never seen by another process
    except SafetensorError as e:  # how safetensors reports a full disk or an unwritable file
        raise OSError(str(e)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_tiny_model(family, spec: dict, tmp: Path):
    tokenizer = build_tokenizer(family)
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(
        vocab_size=vocab, hidden_size=spec["text_hidden"], intermediate_size=spec["text_hidden"] * 3,
        num_hidden_layers=spec["text_layers"], num_attention_heads=spec["text_heads"],
        num_key_value_heads=spec["text_heads"] // 2, max_position_embeddings=32768,
        initializer_range=0.5,  # peaked random logits: greedy decoding is not decided by rounding
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=spec["vision_layers"],
                  num_attention_heads=4, patch_size=14)
    torch.manual_seed(SEED)
    model, image_processor = family.tiny_model(spec, tokenizer, text, vision)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)


def build_tokenizer(family) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the family's special tokens and a copy of its real chat template."""
    extra = list(getattr(family, "tiny_extra_tokens", []))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700 + len(extra), special_tokens=SPECIAL_TOKENS + extra,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    specials = dict(family.tiny_special_tokens)
    if "bos_token" in specials:  # Llama's tokenizer starts every sequence with <s>
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    tokenizer.chat_template = family.chat_template
    return tokenizer
