"""Rows 25-27 of `python -m pipeline.bench`: many conversations at once, on vLLM or on zipchat's own decoder.

N conversations (1, 4, 8, 16) about N different photos arrive together; each asks two questions. On the
transformers engine they wait in the app's one-at-a-time queue (every first question in arrival order, then
every second one: what `demo.queue(default_concurrency_limit=1)` does); on vLLM each conversation is a thread
of its own and the server batches them. The photos are compressed before the clock starts (the tower and
the selection stay in zipchat on both engines; this measures the language model's part). Every answer is
exactly `TOKENS` tokens (random weights: the stop ids are ignored on both engines).

Needs vLLM (requirements-vllm.txt): run it in that environment, e.g.
    python -m pipeline.bench --rows 25,26,27 --out /tmp/serving
"""

import statistics
import tempfile
import threading
import time

from PIL import Image

from ..models import load_vlm
from ..session import ChatSession
from .core import Row, arch, row

COUNTS = (1, 4, 8, 16)
QUESTIONS = ("Describe this image in detail.", "What else is there?")
TOKENS = 32
LETTERS = "abcd"


def photo(i: int) -> Image.Image:
    """Conversation i's photo: a 640x480 picture no other conversation has (OneVision: base + 2 tiles)."""
    r = 40 + (37 * i) % 200
    return Image.merge("RGB", [Image.linear_gradient("L").resize((640, 480)),
                               Image.radial_gradient("L").resize((640, 480)),
                               Image.new("L", (640, 480), r)])


def conversations(vlm, n: int, method: str, engine) -> list:
    sessions = []
    for i in range(n):
        s = ChatSession(vlm, method=method, max_new_tokens=TOKENS, stop_at_eos=False, engine=engine)
        s.add_image(photo(i))  # compressed now, before the clock
        sessions.append(s)
    return sessions


def run_queue(sessions) -> dict:
    """The transformers engine: one turn at a time, first questions then second ones, all arrived at t=0."""
    t0 = time.perf_counter()
    ttft = []
    for q in QUESTIONS:
        for s in sessions:
            start = time.perf_counter()
            s.ask(q)
            if q == QUESTIONS[0]:
                ttft.append(start - t0 + s.last_turn.ttft_s)
    return dict(total=time.perf_counter() - t0, ttft=ttft)


def run_concurrent(sessions) -> dict:
    """vLLM: every conversation its own thread from t=0, its two questions one after the other."""
    ttft, cached, errors = [None] * len(sessions), [None] * len(sessions), []

    def converse(i, s, t0):
        try:
            for q in QUESTIONS:
                start = time.perf_counter()
                s.ask(q)
                t = s.last_turn
                if q == QUESTIONS[0]:
                    ttft[i] = start - t0 + t.ttft_s
                else:
                    cached[i] = t.engine_cached_tokens / t.prompt_tokens
                assert t.engine == "vllm" and t.new_tokens == TOKENS, (t.engine, t.new_tokens)
        except Exception as e:  # noqa: BLE001 - reported after the join
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(i, s, t0)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return dict(total=time.perf_counter() - t0, ttft=ttft, cached=cached)


@row("25", "26", "27", title="many conversations at once: vLLM vs the queue, Full vs VisionZip", where="none")
def serving_rows(b) -> list:
    from ..engines.vllm_launch import LocalVLLM
    args = b.args

    # --smoke: the tiny OneVision twin made for vLLM's CPU kernels (heads 32 wide), as the engine tests use
    vlm = load_vlm("tiny-ov-h32", device=args.device, dtype=args.dtype) if args.smoke else arch("llava-ov-0.5b-arch", args)
    name, dtype = vlm.name, str(vlm.dtype).replace("torch.", "")
    tokens = {m: ChatSession(vlm, method=m).add_image(photo(0)).num_tokens for m in ("visionzip", "full")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalVLLM(vlm, f"{tmp}/model", max_model_len=8192,
                                                           log=f"{tmp}/server.log") as engine:
        run_concurrent(conversations(vlm, 2, "visionzip", engine))  # warm-up: the server's first batches
        run_queue(conversations(vlm, 1, "visionzip", None))
        vz = {}
        for n, letter in zip(COUNTS, LETTERS):
            vz[n] = run_concurrent(conversations(vlm, n, "visionzip", engine))
            queue = run_queue(conversations(vlm, n, "visionzip", None))
            common = (f"{n} conversation{'s' * (n > 1)} x 2 turns, {name} ({dtype}), VisionZip "
                      f"({tokens['visionzip']} visual tokens), {TOKENS} tokens per answer")
            rows.append(Row(f"25{letter}", f"total time, {common}", "vLLM (batched)", "transformers (queue)",
                            [vz[n]["total"]], [queue["total"]],
                            notes=f"{n / vz[n]['total']:.2f} vs {n / queue['total']:.2f} conversations per second"))
            rows.append(Row(f"26{letter}", f"time to first token of turn 1 (each conversation), {common}",
                            "vLLM (batched)", "transformers (queue)", vz[n]["ttft"], queue["ttft"]))
            print(f"serving: N={n} vLLM {vz[n]['total']:.1f} s, queue {queue['total']:.1f} s", flush=True)
        n = COUNTS[-1]
        full = run_concurrent(conversations(vlm, n, "full", engine))
        rows.append(Row("27a", f"total time on vLLM, {n} conversations x 2 turns, {name}: Full "
                               f"({tokens['full']} visual tokens) vs VisionZip ({tokens['visionzip']})",
                        "Full", "VisionZip", [full["total"]], [vz[n]["total"]],
                        notes=f"users served per second: Full {n / full['total']:.2f}, VisionZip "
                              f"{n / vz[n]['total']:.2f}"))
        rows.append(Row("27b", f"turn 2's prompt tokens from vLLM's prefix cache, {n} conversations, {name}",
                        "VisionZip", "Full", vz[n]["cached"], full["cached"], unit="share",
                        notes="share of turn 2's prompt (turn 1, its image and answer) served from the cache; "
                              f"median VisionZip {statistics.median(vz[n]['cached']):.2f}, "
                              f"Full {statistics.median(full['cached']):.2f}"))
    return rows
