"""Decoding a clip (pipeline/video.py, issue 36), on clips the tests write with PyAV: moving coloured squares (each
frame differs), a phone clip with a rotation in its track header, an audio-only file, a truncated file, and an
hour-long clip of a few key frames. The sampled indices equal transformers' sampling arithmetic; the frames equal
transformers' own PyAV reader (which decodes everything up to the last index) at those indices; a sampled frame
is reached by seeking (at most one group of pictures decoded per frame)."""

import math
import struct

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.video import (ClipInfo, frame_at, open_clip, probe, qwen_indices, read_clip, uniform_indices)

av = pytest.importorskip("av")

W, H = 96, 64


def square_frame(i: int) -> np.ndarray:
    """Frame i: a dark background, a coloured 16 px square that moves 3 px right per frame."""
    a = np.full((H, W, 3), 20, np.uint8)
    x = (3 * i) % (W - 16)
    a[24:40, x:x + 16] = ((50 + 40 * i) % 256, (200 - 30 * i) % 256, (90 + 70 * i) % 256)
    return a


def write_clip(path, frames: int, fps: int = 10, gop: int = 6, make=square_frame, codec="libx264"):
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=fps)
    stream.height, stream.width = make(0).shape[:2]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.options = {"bf": "0"} if codec == "libx264" else {}
    for i in range(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(make(i), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "squares.mp4", frames=45)


def reference_frames(path, indices) -> list:
    """transformers' own PyAV reader (video_utils.read_video_pyav) at the same indices."""
    from transformers.video_utils import read_video_pyav
    video, meta = read_video_pyav(str(path), lambda metadata, **kw: np.array(indices))
    return list(video), meta


def test_uniform_indices_are_transformers(squares):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    info = probe(squares)
    assert (info.total_frames, info.fps, info.width, info.height) == (45, 10.0, W, H)
    for n in (1, 7, 8, 16, 45):
        want = default_sample_indices_fn(VideoMetadata(total_num_frames=45, fps=10.0), num_frames=n)
        assert uniform_indices(45, n).tolist() == want.tolist()
    with pytest.raises(InputError, match="45 frame"):
        uniform_indices(45, 46)


def brute_force_qwen(total, fps_clip, fps=2.0, min_frames=4, max_frames=768, patch=2):
    """Qwen2VLVideoProcessor.sample_frames (fps given), restated from its source: the frame count from fps
    clamped to [min_frames, min(max_frames, total) floored to the patch] and to total, floored to the patch;
    then torch.arange(0, total, total / n).int()."""
    most = math.floor(min(max_frames, total) / patch) * patch
    n = total / fps_clip * fps
    n = min(max(n, min_frames), most, total)
    n = math.floor(n / patch) * patch
    return [int(v) for v in torch.arange(0, total, total / n).int()]


@pytest.mark.parametrize("total,fps", [(45, 10.0), (300, 30.0), (7, 25.0), (1801, 29.97), (100000, 24.0)])
def test_qwen_indices_are_its_processors(total, fps):
    got = qwen_indices(ClipInfo(total, fps, total / fps, W, H)).tolist()
    assert got == brute_force_qwen(total, fps)
    assert len(got) % 2 == 0 and got == sorted(set(got)) and got[-1] < total


def test_frames_equal_transformers_reader(squares):
    clip = read_clip(squares, num_frames=8)
    assert clip.indices == uniform_indices(45, 8).tolist() and len(clip.frames) == 8
    want, meta = reference_frames(squares, clip.indices)
    assert meta.total_num_frames == 45 and meta.fps == 10.0
    for got, ref in zip(clip.frames, want):
        assert np.array_equal(np.asarray(got), ref)
    assert clip.times == pytest.approx([i / 10 for i in clip.indices])
    # the frames differ: the square moved
    assert len({np.asarray(f).tobytes() for f in clip.frames}) == 8


def test_seeking_decodes_one_group_per_frame(tmp_path):
    """An hour at 1 fps with a key frame every 60 frames: each sampled frame costs at most one group of pictures
    (60 frames), not the 3,600 frames before it; the frames are the right ones (the square's place)."""
    gop = 60
    path = write_clip(tmp_path / "hour.mp4", frames=3600, fps=1, gop=gop,
                      make=lambda i: square_frame(i // 60))  # one picture a minute: a few key frames' worth
    info = probe(path)
    assert (info.total_frames, info.duration) == (3600, 3600.0)

    class Counting:
        def __init__(self, container):
            self.container, self.decoded = container, 0

        def seek(self, *a, **k):
            return self.container.seek(*a, **k)

        def decode(self, *a, **k):
            for frame in self.container.decode(*a, **k):
                self.decoded += 1
                yield frame

    container, stream = open_clip(path)
    counting = Counting(container)
    try:
        for index in uniform_indices(3600, 8):
            before = counting.decoded
            frame = frame_at(counting, stream, int(index), info.fps)
            assert frame.pts * stream.time_base == index
            assert counting.decoded - before <= gop
            row = frame.to_ndarray(format="rgb24")[32].astype(int)
            x = int(np.argmax(np.abs(row - 20).max(1) > 50))  # the square's left edge
            assert abs(x - (3 * (index // 60)) % (W - 16)) <= 1
    finally:
        container.close()
    assert counting.decoded <= 8 * gop


def phone_clip(path):
    """A landscape clip whose track header holds a phone's portrait matrix (rotate 90 degrees clockwise to
    show), as phones write it. The stored frames have a white left edge."""
    def white_left(i):
        a = square_frame(i)
        a[:, :8] = 255
        return a
    write_clip(path, frames=12, make=white_left)
    data = bytearray(path.read_bytes())
    q = data.find(b"tkhd") + 4  # version 0: the matrix is 40 bytes after its version and flags
    assert data[q] == 0
    data[q + 40:q + 76] = struct.pack(">9I", 0, 0x10000, 0, -0x10000 & 0xFFFFFFFF, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


def test_a_phone_clip_is_turned_upright(tmp_path):
    clip = read_clip(phone_clip(tmp_path / "phone.mp4"), num_frames=4)
    assert clip.size == (H, W) and clip.info.rotation == 270  # portrait: 64 wide, 96 tall
    top = np.asarray(clip.frames[0])[:6].reshape(-1, 3)  # the stored left edge is now the top
    assert top.min() > 200


def test_hostile_files_are_messages(tmp_path, squares):
    audio = tmp_path / "voice.m4a"
    out = av.open(str(audio), "w")
    stream = out.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for packet in list(stream.encode(frame)) + list(stream.encode()):
        out.mux(packet)
    out.close()
    with pytest.raises(InputError, match="no video stream"):
        read_clip(audio)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(squares.read_bytes()[: squares.stat().st_size // 2])
    with pytest.raises(InputError):
        read_clip(cut)
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video at all")
    with pytest.raises(InputError, match="not a video"):
        read_clip(junk)
    for bad in (0, 65, None):
        with pytest.raises(InputError, match="Frames per clip"):
            read_clip(squares, num_frames=bad)
    assert len(read_clip(squares, num_frames=8).frames) == 8  # and nothing else changed


def test_caps_are_messages(tmp_path, squares, monkeypatch):
    import pipeline.video as video
    monkeypatch.setattr(video, "MAX_SECONDS", 2.0)
    with pytest.raises(InputError, match="minutes long"):
        probe(squares)
    monkeypatch.setattr(video, "MAX_SECONDS", 3600.0)
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 64 * 64)
    with pytest.raises(InputError, match="per frame"):
        read_clip(squares)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animations_are_clips(tmp_path, suffix):
    """Animated GIF (FFmpeg) and WebP (Pillow: FFmpeg's decoder takes no animation): frames at the uniform
    indices, times from the frames' durations."""
    from PIL import Image
    frames = [Image.fromarray(square_frame(i)) for i in range(12)]
    path = tmp_path / f"moving{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    clip = read_clip(path, num_frames=4)
    assert clip.indices == [0, 3, 6, 9] and clip.times == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert (clip.info.total_frames, clip.info.fps) == (12, pytest.approx(10.0))
    for i, frame in zip(clip.indices, clip.frames):
        assert frame.size == (W, H)
        x = int(np.argmax(np.abs(np.asarray(frame)[32].astype(int) - 20).max(1) > 50))
        assert x == 3 * i  # the square where frame i put it (a palette or lossless: the place survives)
