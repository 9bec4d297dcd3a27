"""zipchat: chat about an image while seeing which visual tokens the language model gets.

Gradio UI only: components, event wiring and launch flags. All model work is in `pipeline/`.
Run `python app.py --help` for the flags.

The per-tab state is plain data (pipeline.ChatState: the conversation, images, compressed
features on the CPU, settings). Models are loaded once at startup and looked up by name; the
handlers that run a model are wrapped in `spaces.GPU` when the `spaces` package is installed, take
the state and return (or yield, last) the updated state, because on ZeroGPU they run in another
process. KV caches live in a process-local store keyed by session: a speed-up only.
"""

import importlib
import json
import logging
import signal
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:  # Hugging Face ZeroGPU: imported before torch, as the `spaces` package asks
    import spaces
except ImportError:
    spaces = None
import gradio as gr  # noqa: E402

from pipeline import SGL_PAIRS, InputError, ModelUnavailable, load_vlm  # noqa: E402
from pipeline.examples import ExampleCache  # noqa: E402
from pipeline.methods import registry  # noqa: E402
from pipeline.methods.sgl import check_pair  # noqa: E402
from pipeline.models import default_preset, offline_twin  # noqa: E402
from ui.flags import FlagError, arguments, checked  # noqa: E402
from ui.handlers import Handlers, on_zero_gpu  # noqa: E402
from ui.layout import build  # noqa: E402
from ui.security import NoRemoteResources  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

log = logging.getLogger("zipchat")
ASSETS = Path(__file__).resolve().parent / "assets"
CSS = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").is_file() else None
# The settings panel opens on a wide screen; on a phone it stays closed (open, it would cover the chat) until
# its toggle is pressed. On a phone, a new message (an example's photo and question) stays at the top of the
# chat while its answer streams under it, where Gradio would follow the answer's tail; the person's own
# scrolling (a touch, a wheel) lets go of it.
PAGE_JS = """() => {
  if (window.innerWidth >= 700) {
    const open = (tries) => { const b = document.querySelector('#settings:not(.open) .toggle-button');
      if (b) b.click(); else if (tries > 0) setTimeout(() => open(tries - 1), 100); };
    open(50);
  }
  if (!window.matchMedia('(max-width: 600px)').matches) return;
  let seen = -1, pinned = null, box = null;
  const scroller = (el) => { for (let e = el.parentElement; e; e = e.parentElement) {
    const s = getComputedStyle(e).overflowY;
    if ((s === 'auto' || s === 'scroll') && e.scrollHeight > e.clientHeight) return e; } return null; };
  const hold = () => { if (!pinned || !box) return;
    const top = pinned.getBoundingClientRect().top - box.getBoundingClientRect().top + box.scrollTop - 8;
    if (Math.abs(box.scrollTop - top) > 2) box.scrollTop = top; };
  const release = () => { pinned = null; };
  new MutationObserver(() => {
    const users = document.querySelectorAll('#chatbot .message.user');
    if (seen < 0 || users.length < seen) { seen = users.length; pinned = null; }
    if (users.length > seen) { pinned = users[seen]; seen = users.length; }
    if (pinned && !box) { box = scroller(pinned);
      if (box) { box.addEventListener('scroll', hold);
        for (const t of ['touchstart', 'wheel']) box.addEventListener(t, release, {passive: true}); } }
    hold();
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""
demo = None  # the running app, once main() has built it (Gradio's reloader on a Space looks it up here)


def load_models(name: str, small_name: str | None = "auto", dtype=None, device_map=None):
    """-> (large vlm, small vlm or None, banner or None). Without weights, start on the tiny
    models of the same family (tiny-ov-large guided by tiny-ov-small for OneVision)."""
    banner = None
    try:
        vlm = load_vlm(name, dtype=dtype, device_map=device_map)
    except ModelUnavailable as e:
        tiny = offline_twin(name)
        print(f"[zipchat] {e}\n[zipchat] Starting on the offline tiny model '{tiny}' instead. To use real weights, "
              f"run `hf download <repo>` with network (presets: pipeline/models.py) and start again, "
              f"or pass --model /path/to/local/checkpoint.", file=sys.stderr)
        banner = (f"**Offline demo:** '{name}' could not be loaded, so this runs `{tiny}`, a tiny model with "
                  "random weights. Its answers are random text until real weights are available; the compression, "
                  "heatmaps and timings are real.")
        vlm, name = load_vlm(tiny), tiny
    if banner is None and vlm.is_tiny:  # named on purpose (tests, the offline SGL and vLLM demos): said all the same
        banner = (f"**Tiny model:** `{name}` has random weights (zipchat builds it offline for tests and demos), so "
                  "its answers are random text; the compression, heatmaps and timings are real.")
    return vlm, sgl_partner(vlm, name, small_name, dtype, device_map), banner


def sgl_partner(vlm, name: str, small_name: str | None, dtype, device_map):
    """SGL's small model, or None. A partner named on purpose must share the large model's visual layout
    (InputError otherwise: the app refuses to start); the preset's own ("auto") is left out with a line."""
    chosen = small_name != "auto"
    small_name = SGL_PAIRS.get(name) if small_name == "auto" else small_name
    if not small_name:
        return None
    try:
        small = load_vlm(small_name, dtype=dtype, device_map=device_map)
        check_pair(small, vlm)
        return small
    except (ModelUnavailable, InputError) as e:
        if chosen and isinstance(e, InputError):
            raise
        print(f"[zipchat] SGL disabled: {e}", file=sys.stderr)
        return None


def build_demo(vlm, banner: str | None = None, max_new_tokens: int = 256, method_default: str = "visionzip",
               small=None, session_options: dict | None = None, max_tiles: int | None = None,
               image_memory: int = 1 << 30, examples: ExampleCache | None = None, answers_at_once: int = 1
               ) -> gr.Blocks:
    """The page on these models. `max_tiles`: the tiles per image the compress-once methods encode by
    default (tiling families): 4 (base + up to 2x2) on a CPU, where the vision encoder dominates the first
    answer; 0 (the checkpoint's own) on a GPU. `image_memory`: bytes of images and compressed features all
    conversations keep together (memory.py). `examples`: the example images compressed ahead
    (examples.py); on ZeroGPU the first answer in each worker fills it, after the person's answer.
    `answers_at_once`: answers run together (the vLLM engine batches them; zipchat's decoder: 1)."""
    if max_tiles is None:
        max_tiles = 4 if vlm.device.type == "cpu" else 0
    handlers = Handlers(vlm, small, max_new_tokens, method_default, session_options, max_tiles, image_memory,
                        examples, example_paths())
    return build(handlers, banner, ASSETS / "examples.json", answers_at_once)


def example_paths() -> list:
    return [str(ASSETS / e["image"]) for e in json.loads((ASSETS / "examples.json").read_text())]


def launch_options() -> dict:
    """What `python app.py` passes to launch(), besides host and port (tests launch with the same)."""
    # show_error: an API call that Gradio's own input checks refuse gets their message, not a generic one;
    # the page loads images and media only from the app itself (ui/security.py: answers are model output)
    return dict(max_file_size="25mb", css=CSS, js=PAGE_JS, show_error=True,
                app_kwargs={"middleware": [Middleware(NoRemoteResources)]})


def main(argv=None):
    parser = arguments()
    args = parser.parse_args(argv)
    try:
        checked(args, sys.argv[1:] if argv is None else list(argv))
    except FlagError as e:  # before anything loads: one line naming the flag or Space variable
        parser.exit(2, f"[zipchat] {e}\n")
    prepare_space_reloader()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[zipchat] %(message)s"))
    log.addHandler(handler)  # zipchat's own messages; the libraries keep their defaults (no request lines)
    log.setLevel(logging.INFO)
    try:
        vlm, small, banner = load_models(args.model or default_preset(), args.small_model, dtype=args.dtype,
                                         device_map=args.device_map)
    except (ModelUnavailable, InputError) as e:  # (no weights, not even a tiny model; an SGL pair that cannot
        parser.exit(1, f"[zipchat] {e}\n")  # work together: say why, no traceback)
    if registry.get(args.method).needs_small and small is None:
        parser.error(f"--method {args.method} needs a small model (--small-model)")
    options = {"stop_at_eos": False} if args.ignore_eos else {}
    if args.clip_frames is not None:
        options["clip_frames"] = args.clip_frames
    if args.engine == "vllm":
        try:
            options["engine"] = start_engine(vlm, args.vllm_url, app_port=args.port)
        except (ModelUnavailable, InputError) as e:
            parser.exit(1, f"[zipchat] {e}\n")
    examples = None if args.no_warm_examples else ExampleCache()
    max_tiles = args.max_tiles if args.max_tiles is not None else (4 if vlm.device.type == "cpu" else 0)
    built = build_demo(vlm, banner, args.max_new_tokens, args.method, small=small,
                       session_options=options, max_tiles=max_tiles,
                       image_memory=args.image_memory << 20, examples=examples,
                       answers_at_once=max(1, args.answers_at_once) if "engine" in options else 1)
    built.queue(default_concurrency_limit=1)  # one GPU: one generation at a time, others wait in line
    global demo
    demo = built  # where Gradio's reloader on a Space looks for the app (else it logs that it did not find it)
    sys.unraisablehook = quiet_leaked_event_loops
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_options())
    if examples is not None and not on_zero_gpu():  # the gallery, compressed while nobody is waiting
        threading.Thread(target=examples.warm, args=(vlm, example_paths(), args.method),
                         kwargs={"max_tiles": max_tiles}, daemon=True, name="warm-examples").start()
    demo.block_thread()


def start_engine(vlm, url: str | None, app_port: int | None = None):
    """The vLLM engine for `vlm`: the server at `url`, or one zipchat starts for the model (stopped at exit)."""
    from pipeline.engines.vllm import VLLMEngine
    from pipeline.engines.vllm_client import VLLMServer
    from pipeline.engines.vllm_export import causal_lm_class
    causal_lm_class(vlm)  # Qwen2.5-VL and unknown decoders: refused before anything starts
    if url:
        engine = VLLMEngine(VLLMServer(url), vlm)
        log.info(f"vLLM engine: {url} serving {engine.model()}")
        return engine
    import atexit
    from pipeline.engines.vllm_launch import LocalVLLM
    from pipeline.tiny import tiny_cache_dir
    head = vlm.language_model.config.hidden_size // vlm.language_model.config.num_attention_heads
    if vlm.device.type == "cpu" and head < 32:
        raise ModelUnavailable(f"{vlm.name}'s attention heads are {head} wide; vLLM's CPU kernels need 32 or more. "
                               "Offline, use a tiny model made for it: --model tiny-ov-h32 (or tiny-llava-h32, "
                               "tiny-internvl-h32).")
    export = tiny_cache_dir().parent / "vllm" / vlm.name.replace("/", "--")
    log.info(f"Starting a vLLM server for {vlm.name}'s language model (exported to {export}) ...")
    server = LocalVLLM(vlm, export, log=str(export) + ".log", avoid_ports=(app_port,))
    atexit.register(server.stop)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # (Docker, systemd, a Space's restart; a closed terminal): exit
        signal.signal(sig, lambda *_: sys.exit(0))  # normally, so that the server is stopped (atexit)
    log.info(f"vLLM engine: {server.engine.url}")
    return server.engine


def prepare_space_reloader():
    """On a Space (SYSTEM=spaces with a SPACE_ID), Gradio 6.31 starts the `spaces` package's reload server in a
    thread at launch, and importing it scans every live object of the process for code (its vendored
    `codefind`), holding the GIL for seconds: 5.6 s here before the models load, 9.3 s after (a 2-core AVX2
    EPYC). Launch meanwhile asks the app's own page once, with a 3 s timeout, and exits with "When localhost
    is not accessible, a shareable link must be created" when it is slow: the Space never starts. So the
    scan runs first, here, before the models load (the heap is smaller then); the reload server later
    finds it done."""
    if os.environ.get("SYSTEM") != "spaces" or not os.environ.get("SPACE_ID") or spaces is None:
        return
    try:
        importlib.import_module("spaces.reloading.server")  # (the scan happens at this import)
    except ImportError:  # a `spaces` without the reloader (older, or the tests' ZeroGPU stand-in)
        pass


def quiet_leaked_event_loops(unraisable):
    """Gradio (6.x, `utils.safe_get_lock`) leaves an unclosed asyncio event loop behind for each lock it
    makes outside a running loop. On a Space the `spaces` reloader's code scan closes their sockets first,
    so collecting them prints "Exception ignored in BaseEventLoop.__del__ ... Invalid file descriptor: -1"
    into the log people read. Only that case is silenced; everything else is printed as usual."""
    if not (isinstance(unraisable.exc_value, ValueError) and "Invalid file descriptor" in str(unraisable.exc_value)
            and getattr(unraisable.object, "__qualname__", "") == "BaseEventLoop.__del__"):
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    main()
