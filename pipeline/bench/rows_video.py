"""Rows of a clip (29, 30): on OneVision-7B's shapes at half width and depth, a 16-frame clip's first prefill,
VisionZip (54+10 per frame) vs Full (196 per frame + a newline), and its turn 2 with the KV cache reused vs
recomputed; the same on Qwen2.5-VL-3B's shapes (half width and depth) with a 640x360 clip (16 frames: 8 temporal
groups of 13x23 units; VisionZip keeps 64/576 of each group's); and decoding a 1-minute 1080p clip for 16 frames,
by seeking vs transformers' own PyAV reader (which decodes every frame up to the last one it samples)."""

import tempfile
import time
from pathlib import Path

import numpy as np

from ..session import ChatSession
from ..state import Turn
from ..video import read_clip, uniform_indices
from .core import QUESTION, Row, arch, floor_s, llm_prefill_cost, prefill_timer, row, side_by_side, turn_two_timer

FRAMES = 16


def write_clip(path: Path, seconds: int, width: int, height: int, fps: int = 30) -> Path:
    """A clip of moving colour bars (x264, a key frame every 2 seconds, as phones and cameras write)."""
    import av
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = 2 * fps
    stream.codec_context.options = {"preset": "ultrafast"}
    x = np.arange(width)[None, :, None]
    for i in range(seconds * fps):
        bars = ((x + 8 * i) // max(1, width // 8) * np.array([37, 91, 53])) % 256  # (1, W, 3)
        frame = np.broadcast_to(bars, (height, width, 3)).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


@row('29', '29b', '29c', title='a 16-frame clip: prefill, turn 2, decoding a 1-minute 1080p clip')
def rows_clip(b) -> list:
    args, clock, hw = b.args, b.clock, b.hw
    vlm = arch("llava-ov-7b-arch", args, quick=True)
    with tempfile.TemporaryDirectory() as folder:
        small = write_clip(Path(folder) / "clip.mp4", 4 if args.smoke else 16, 320, 180)
        rows = [prefill(vlm, small, "29", "VisionZip 54+10 per frame", "full (196 per frame + 1)", b,
                        notes="Full already pools each frame 2x2 (729 -> 196 tokens): 64 per frame is a third of "
                              "its tokens, so a prefill near 0.33 of Full's is what the token counts allow")]
        rows.append(turn_two(vlm, small, clock, args, hw))
        big = write_clip(Path(folder) / "minute.mp4", 2 if args.smoke else 60, 320 if args.smoke else 1920,
                         180 if args.smoke else 1080)
        rows.append(decoding(big, clock, args))
    return rows


@row('30', '30b', title='a 16-frame 640x360 clip on Qwen2.5-VL-3B shapes: prefill, turn 2')
def rows_qwen_clip(b) -> list:
    vlm = arch("qwen2.5-vl-3b-arch", b.args, quick=True)
    with tempfile.TemporaryDirectory() as folder:
        clip = write_clip(Path(folder) / "clip.mp4", 4 if b.args.smoke else 16, 640, 360)
        return [prefill(vlm, clip, "30", "VisionZip (64/576 of each group's units)", "full (every unit)", b,
                        notes="16 frames are 8 temporal groups (pairs) of 13x23 units, each at M-RoPE time positions"),
                turn_two(vlm, clip, b.clock, b.args, b.hw, "30b")]


def prefill(vlm, clip, number: str, a: str, full: str, b, notes: str = "") -> Row:
    """The clip's first LLM prefill, VisionZip's tokens vs Full's."""
    sides = {}
    for method in ("visionzip", "full"):
        s = ChatSession(vlm, method=method, max_new_tokens=1)
        s.add_video(clip, num_frames=FRAMES)
        plan = s.plan(Turn(QUESTION, list(s.state.pending)))
        features = [u.features for u in plan.slots if u.features is not None]
        sides[method] = prefill_timer(vlm, plan.ids, features, vlm.family.positions(plan.ids, plan.slots)), len(plan.ids)
    ta, tb = side_by_side(b.clock, sides["visionzip"][0], sides["full"][0], b.args.repeats)
    n_zip, n_full = sides["visionzip"][1], sides["full"][1]
    return Row(number, f"LLM prefill, {vlm.name}, a {FRAMES}-frame clip ({n_zip} vs {n_full} tokens)", a, full, ta, tb,
               target="<= 0.15", floor_a_s=floor_s(llm_prefill_cost(vlm, n_zip), b.hw),
               floor_b_s=floor_s(llm_prefill_cost(vlm, n_full), b.hw), notes=notes)


def turn_two(vlm, clip, clock, args, hw, number: str = "29b") -> Row:
    """29b: turn 2 on the clip (VisionZip), its time to first token with the KV cache reused vs recomputed."""
    sessions = {}
    for reuse in (True, False):
        s = ChatSession(vlm, method="visionzip", max_new_tokens=4, reuse_cache=reuse)
        s.add_video(clip, num_frames=FRAMES)
        s.ask(QUESTION)
        sessions[reuse] = turn_two_timer(s, "And what happens next?"), s
    ta, tb = side_by_side(clock, sessions[True][0], sessions[False][0], args.repeats)
    t = sessions[True][1].last_turn
    return Row(number, f"turn-2 time to first token on a {FRAMES}-frame clip, {vlm.name}, VisionZip "
               f"({t.prompt_tokens} tokens in context)", f"KV reuse ({t.prefill_tokens} new tokens)",
               "recompute the conversation", ta, tb, target="<= 0.1",
               floor_a_s=floor_s(llm_prefill_cost(vlm, t.prefill_tokens, t.prompt_tokens), hw),
               floor_b_s=floor_s(llm_prefill_cost(vlm, t.prompt_tokens), hw))


def decoding(path: Path, clock, args) -> Row:
    """29c: 16 frames of a 1-minute 1080p clip: zipchat's reader (a seek per frame) vs transformers' PyAV reader
    (decodes every frame up to the last index), both at transformers' uniform indices."""
    from transformers.video_utils import read_video_pyav
    info_frames = []

    def ours():
        info_frames[:] = [read_clip(path, FRAMES)]

    def theirs():
        read_video_pyav(str(path), lambda metadata, **kw: uniform_indices(metadata.total_num_frames, FRAMES))
    t0 = time.perf_counter()
    ta, tb = side_by_side(clock, ours, theirs, max(1, args.repeats // 2), warmup=0)
    clip = info_frames[0]
    return Row("29c", f"decode and sample {FRAMES} frames of a {clip.info.duration:.0f} s "
               f"{clip.info.width}x{clip.info.height} clip ({clip.info.total_frames} frames)",
               "seek per frame (zipchat)", "decode up to the last index (transformers' PyAV reader)", ta, tb,
               target="<= 0.5", notes=f"both sampled {len(clip.frames)} frames; {time.perf_counter() - t0:.0f} s in all")
