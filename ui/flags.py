"""`python app.py`'s flags, each defaulting to its Space variable, and their check: every value, from a flag or
the environment, is checked before anything loads, and a wrong one ends the start with one line naming the
flag or variable, the value, and what is allowed (a Space's log shows that line, not a traceback)."""

import argparse
import importlib.util
import os

from pipeline import engines
from pipeline.methods import registry

# dest -> (flag, Space variable, kind, allowed): what `checked` makes of each value
NUMBERS = {"max_new_tokens": ("--max-new-tokens", "ZIPCHAT_MAX_NEW_TOKENS", 1, 1_000_000),
           "max_tiles": ("--max-tiles", "ZIPCHAT_MAX_TILES", 0, 36),
           "clip_frames": ("--clip-frames", "ZIPCHAT_CLIP_FRAMES", 1, 64),
           "image_memory": ("--image-memory", "ZIPCHAT_IMAGE_MEMORY_MB", 1, 1_000_000),
           "answers_at_once": ("--answers-at-once", "ZIPCHAT_ANSWERS_AT_ONCE", 1, 1024),
           "port": ("--port", "GRADIO_SERVER_PORT", 1, 65535)}
CHOICES = {"method": ("--method", "ZIPCHAT_METHOD", registry.names),
           "dtype": ("--dtype", "ZIPCHAT_DTYPE", lambda: ("float32", "bfloat16", "float16")),
           "engine": ("--engine", "ZIPCHAT_ENGINE", lambda: engines.NAMES)}


class FlagError(ValueError):
    """A flag or Space variable with a value zipchat cannot start with."""


def arguments() -> argparse.ArgumentParser:
    """`python app.py`'s flags; each defaults to its Space variable (read as text: `checked` converts it)."""
    parser = argparse.ArgumentParser(description="zipchat: VisionZip chat about images")
    env = os.environ.get  # a Space runs `python app.py` with no arguments: its variables set the defaults
    add = parser.add_argument
    add("--model", default=env("ZIPCHAT_MODEL"),
        help="preset, hub id or local directory (default: $ZIPCHAT_MODEL, else by hardware)")
    add("--small-model", default=env("ZIPCHAT_SMALL_MODEL", "auto"),
        help="small model for SGL; 'auto' picks the preset's partner (llava-ov-7b -> llava-ov-0.5b), '' disables SGL "
             "(default: $ZIPCHAT_SMALL_MODEL, else auto)")
    add("--method", default=env("ZIPCHAT_METHOD", "visionzip"), help=f"one of {', '.join(registry.names())}")
    add("--host", default=env("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; Spaces set 0.0.0.0)")
    add("--port", default=env("GRADIO_SERVER_PORT") or "7860", help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    add("--share", action="store_true", help="create a public gradio.live link")
    add("--max-new-tokens", default=env("ZIPCHAT_MAX_NEW_TOKENS") or "256")
    add("--dtype", default=env("ZIPCHAT_DTYPE"), help="float32, bfloat16 or float16; default: bf16 on a GPU, and on "
                                                      "a CPU that computes it natively (AVX512-BF16/AMX); else float32")
    add("--max-tiles", default=env("ZIPCHAT_MAX_TILES"),
        help="tiles per image VisionZip encodes, 0 to 36 (Qwen2.5-VL: the area of 1 + this many 448 px tiles); "
             "default 4 on a CPU, 0 (the checkpoint's own limit) on a GPU")
    add("--clip-frames", default=env("ZIPCHAT_CLIP_FRAMES"),
        help="frames a clip is sampled at, 1 to 64 (models that take video); default 8 on a CPU, on a GPU the "
             "checkpoint's (LLaVA-OneVision 32, InternVL3 8, Qwen2.5-VL 2 a second)")
    add("--image-memory", default=env("ZIPCHAT_IMAGE_MEMORY_MB") or "1024",
        help="MB of images and compressed features all conversations keep together; past it the least recently "
             "used idle conversation's images are dropped (default: $ZIPCHAT_IMAGE_MEMORY_MB, else 1024)")
    add("--no-warm-examples", action="store_true", default=env("ZIPCHAT_WARM_EXAMPLES", "1").lower() in ("0", "false", "no"),
        help="do not compress the example images ahead (default: compress them right after launch, at low "
             "priority; $ZIPCHAT_WARM_EXAMPLES=0 turns it off too)")
    add("--device-map", default=env("ZIPCHAT_DEVICE_MAP"),
        help="'auto': let accelerate place a model too large for one GPU across the GPUs (and CPU)")
    add("--engine", default=env("ZIPCHAT_ENGINE", "transformers"),
        help=f"what runs the language model for Full and the compress-once methods: {' or '.join(engines.NAMES)} "
             "(vLLM from zipchat's compressed embeddings; needs requirements-vllm.txt; FastV, DART and SGL stay on "
             "transformers). Default: $ZIPCHAT_ENGINE, else transformers")
    add("--vllm-url", default=env("ZIPCHAT_VLLM_URL"),
        help="a running vLLM server for --engine vllm (see docs/serving.md); default: $ZIPCHAT_VLLM_URL, else "
             "zipchat starts one on 127.0.0.1 for the model")
    add("--answers-at-once", default=env("ZIPCHAT_ANSWERS_AT_ONCE") or "16",
        help="--engine vllm: answers (and Compares) that run together, batched by vLLM; more wait in line "
             "(default: $ZIPCHAT_ANSWERS_AT_ONCE, else 16). zipchat's own decoder: always 1")
    add("--ignore-eos", action="store_true", help=argparse.SUPPRESS)  # tests: only Stop ends answers
    return parser


def source(flag: str, variable: str, argv: list) -> str:
    """How a person set a value: the flag where the command line has it, else the Space variable."""
    return flag if any(a == flag or a.startswith(flag + "=") for a in argv) else variable


def checked(args, argv: list):
    """`args` with its numbers as numbers; FlagError (one line) for the first value zipchat cannot start with."""
    for dest, (flag, variable, low, high) in NUMBERS.items():
        value = getattr(args, dest)
        if value is None:  # (max_tiles, clip_frames: by device)
            continue
        where = source(flag, variable, argv)
        try:
            number = int(str(value).strip())
        except ValueError:
            raise FlagError(f"{where}={value!r} is not a whole number; use {low} to {high:,}.") from None
        if not low <= number <= high:
            raise FlagError(f"{where}={value!r} is out of range; use {low} to {high:,}.")
        setattr(args, dest, number)
    for dest, (flag, variable, allowed) in CHOICES.items():
        value = getattr(args, dest)
        if value is not None and value not in allowed():
            raise FlagError(f"{source(flag, variable, argv)}={value!r} is not one of: {', '.join(allowed())}.")
    if args.vllm_url and args.engine != "vllm":
        raise FlagError(f"{source('--vllm-url', 'ZIPCHAT_VLLM_URL', argv)}={args.vllm_url!r} needs --engine vllm "
                        f"(ZIPCHAT_ENGINE=vllm); the engine is {args.engine!r}.")
    if args.engine == "vllm" and not args.vllm_url and importlib.util.find_spec("vllm") is None:
        raise FlagError(f"{source('--engine', 'ZIPCHAT_ENGINE', argv)}='vllm' needs vLLM installed (the environment "
                        "of requirements-vllm.txt, docs/serving.md) or a running server (--vllm-url).")
    return args
