"""Command line: `python -m pipeline ask --model tiny-llava --image assets/chelsea.png "What is this?"`."""

import argparse
import sys

from .errors import InputError
from .methods import registry
from .models import PRESETS, load_vlm
from .session import ChatSession


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="zipchat pipeline command line")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask one or more questions about an image; prints answers and turn stats")
    ask.add_argument("questions", nargs="+", help="one question per turn")
    ask.add_argument("--model", default="tiny-llava", help=f"preset ({', '.join(PRESETS)}), hub id or directory")
    ask.add_argument("--image", help="image file (omit for a text-only chat)")
    ask.add_argument("--method", default="visionzip", help="(methods with a small model or picks by hand: the app)",
                     choices=[m.name for m in registry.all_methods() if not m.needs_small and m.kind != registry.MANUAL])
    ask.add_argument("--dominant", type=int, default=54)
    ask.add_argument("--contextual", type=int, default=10)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--device")
    ask.add_argument("--dtype")
    ask.add_argument("--device-map", help="'auto': accelerate places the model across GPUs (and CPU)")
    args = parser.parse_args(argv)

    try:
        vlm = load_vlm(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
        session = ChatSession(vlm, method=args.method, dominant=args.dominant, contextual=args.contextual,
                              max_new_tokens=args.max_new_tokens)
        if vlm.is_tiny:
            print("note: tiny random-weight model, answers are random text", file=sys.stderr)
        if args.image:
            comp = session.add_image(args.image)
            print(f"image: {comp.caption()}, encoded in {comp.encode_s * 1000:.0f} ms")
        for question in args.questions:
            print(f"\nQ: {question}\nA: ", end="", flush=True)
            for delta in session.ask_stream(question):
                print(delta, end="", flush=True)
            print()
            t = session.last_turn
            print(f"   [{t.model_used} {t.method}: visual {t.visual_tokens}/{t.visual_tokens_full}, prompt {t.prompt_tokens} "
                  f"(prefilled {t.prefill_tokens}), ttft {t.ttft_s * 1000:.0f} ms, prefill {t.prefill_s * 1000:.0f} ms, "
                  f"{t.new_tokens} tokens at {t.decode_tok_per_s:.1f} tok/s, cache reused: {t.cache_reused}, "
                  f"images encoded: {t.images_encoded}, KV {t.kv_cache_bytes / 1e6:.2f} MB, {t.device}/{t.dtype}]")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
