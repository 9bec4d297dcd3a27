"""A clip, decoded: the frames a checkpoint's video processor would sample, as upright RGB images with their times.

PyAV (`av` on PyPI: its wheels carry FFmpeg; no system FFmpeg, torchvision or torchcodec) opens the file. The
clip's metadata is read as transformers' own PyAV reader reads it (video_utils.read_video_pyav: the stream's
frame count and average rate), so the sampled indices are those transformers' video processors compute:
  - uniform (`uniform_indices`, transformers' default_sample_indices_fn): i * total // n for i < n;
  - Qwen2-VL's (`qwen_indices`): a number of frames from `fps`, within [min_frames, max_frames], a multiple of
    the temporal patch (2), then arange(0, total, total / n).int().
Each sampled frame is reached by seeking to the keyframe before it and decoding forward to it (a clip is never
decoded whole: an hour-long clip costs one short decode per sampled frame), and turned upright by the rotation
the file records (phone clips). Caps on duration, resolution and frames give clear messages (InputError).
"""

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image

from .errors import InputError

MAX_SECONDS = float(os.environ.get("ZIPCHAT_MAX_VIDEO_SECONDS", 3 * 3600))  # a clip's longest duration
MAX_FRAME_PIXELS = int(os.environ.get("ZIPCHAT_MAX_VIDEO_PIXELS", 3840 * 2160))  # 4K: one frame's largest area
MAX_FRAMES = 64  # the most frames one clip may be sampled at
CLIP_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")  # video containers (animations: is_clip_file)


@dataclass
class ClipInfo:
    """What the file says (transformers' VideoMetadata, plus the rotation)."""
    total_frames: int  # the stream's frame count (estimated from duration x rate where the container has none)
    fps: float  # the stream's average rate
    duration: float  # seconds: total_frames / fps
    width: int  # as stored, before rotation
    height: int
    rotation: int = 0  # degrees counter-clockwise that turn a stored frame upright (0, 90, 180, 270)


@dataclass
class Clip:
    info: ClipInfo
    indices: list  # the sampled frames' indices
    frames: list = field(default_factory=list)  # PIL RGB images, upright, one per index
    times: list = field(default_factory=list)  # seconds of each (its presentation time)

    @property
    def size(self) -> tuple:
        """(width, height) of the upright frames."""
        return self.frames[0].size if self.frames else (self.info.width, self.info.height)


@dataclass
class Frames:
    """A clip as a model takes it: its sampled frames resized as the family's video processor resizes them
    (uint8 (F, h, w, 3), before rescaling and normalising), the frames' size in the clip (upright) and their
    times. Reads like an image where a digest needs one (`mode`, `size`, `tobytes`)."""
    pixels: np.ndarray
    shown: tuple  # (width, height) of the upright frames in the clip
    times: tuple  # seconds of each frame
    sampled_fps: float | None = None  # frames sampled per second of the clip (transformers' VideoMetadata.sampled_fps)

    mode = "RGB"

    @property
    def size(self) -> tuple:
        return self.shown

    def tobytes(self) -> bytes:
        return self.pixels.tobytes() + repr(self.times).encode()

    def __len__(self) -> int:
        return len(self.pixels)

    @classmethod
    def of(cls, clip: "Clip", size: tuple) -> "Frames":
        """`clip`'s frames resized to `size` (width, height) with Pillow's bicubic filter (the PIL backend's
        resize, on 8-bit pixels as the video processor resizes them)."""
        # (each frame resized from its PIL image: a 4K clip's frames are never all held as arrays at full size)
        pixels = np.stack([np.asarray(f.convert("RGB").resize(size, Image.BICUBIC)) for f in clip.frames])
        return cls(pixels, clip.size, tuple(clip.times), len(clip.indices) / clip.info.total_frames * clip.info.fps)


def resized(pixels: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 (F, h, w, 3) frames -> (F, size[1], size[0], 3), each with Pillow's bicubic filter (unchanged when
    already that size)."""
    if pixels.shape[2] == size[0] and pixels.shape[1] == size[1]:
        return pixels
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in pixels])


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """transformers' default_sample_indices_fn with num_frames: i * total // n for i < n."""
    if num_frames > total:
        raise InputError(f"The clip has {total} frame(s); {num_frames} were asked for.")
    return np.arange(num_frames, dtype=int) * total // num_frames


def qwen_indices(info: ClipInfo, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
                 temporal_patch: int = 2, num_frames: int | None = None) -> np.ndarray:
    """Qwen2-VL's video processor (sample_frames): the indices for `fps` frames per second, or with `num_frames`
    for that many rounded to a multiple of the temporal patch (a clip with fewer frames: as many as it has, in
    pairs; one frame alone is repeated by the processor's padding)."""
    total = info.total_frames
    if num_frames is not None:
        n = max(temporal_patch, round(num_frames / temporal_patch) * temporal_patch)
        n = min(n, total // temporal_patch * temporal_patch) or total
        import torch
        return torch.arange(0, total, total / n).int().numpy()
    most = math.floor(min(max_frames, total) / temporal_patch) * temporal_patch
    n = min(max(total / info.fps * fps, min_frames), most, total)
    n = math.floor(n / temporal_patch) * temporal_patch
    if n < 1:
        raise InputError(f"The clip is too short: {total} frame(s), and this model needs at least {temporal_patch}.")
    import torch
    return torch.arange(0, total, total / n).int().numpy()


def open_clip(path):
    """-> (container, video stream); InputError for a file that is not a video or has no video stream."""
    import av
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"This file is not a video PyAV can read ({type(e).__name__}).") from None
    if not container.streams.video:
        container.close()
        raise InputError("This file has no video stream (audio only?).")
    return container, container.streams.video[0]


def probe(path) -> ClipInfo:
    """The clip's metadata, checked against the caps."""
    container, stream = open_clip(path)
    try:
        return checked_info(stream_info(container, stream))
    finally:
        container.close()


def stream_info(container, stream) -> ClipInfo:
    rate = stream.average_rate or stream.guessed_rate or 0
    fps = float(rate)
    total = int(stream.frames or 0)
    if total <= 0 and fps > 0:  # (some containers do not count: WebM, Matroska) the duration says it
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        total = int(round(seconds * fps))
    return ClipInfo(total_frames=total, fps=fps, duration=total / fps if fps else 0.0,
                    width=stream.codec_context.width, height=stream.codec_context.height)


def checked_info(info: ClipInfo) -> ClipInfo:
    if info.total_frames < 1 or info.fps <= 0:
        raise InputError("This video has no frames to read (an empty or truncated file?).")
    if info.duration > MAX_SECONDS:
        raise InputError(f"This clip is {info.duration / 60:.0f} minutes long; the limit is "
                         f"{MAX_SECONDS / 60:.0f} minutes. Please cut it and upload again.")
    if info.width * info.height > MAX_FRAME_PIXELS:
        raise InputError(f"This clip's frames are {info.width}x{info.height}; the limit is "
                         f"{MAX_FRAME_PIXELS / 1e6:.1f} MP per frame. Please downscale it and upload again.")
    return info


def read_clip(path, num_frames: int | None = 8, sample=None) -> Clip:
    """The frames at transformers' uniform indices for `num_frames` (or at `sample(info)`'s indices), seeking to
    each. A frame the file cannot give (a truncated clip) ends the clip there; none at all is an InputError.
    An animated WebP (FFmpeg's WebP decoder takes no animation) is read with Pillow."""
    if sample is None:
        check_frames(num_frames)
    if str(path).lower().endswith(".webp"):
        return read_animation(path, num_frames, sample)
    container, stream = open_clip(path)
    try:
        info = checked_info(stream_info(container, stream))
        clip = Clip(info, sampled(info, num_frames, sample))
        for index in clip.indices:
            frame = frame_at(container, stream, index, info.fps)
            if frame is None:
                break
            info.rotation = frame_rotation(frame)
            clip.frames.append(upright(frame.to_image(), info.rotation))
            clip.times.append(float(frame.pts * stream.time_base) if frame.pts is not None else index / info.fps)
        if not clip.frames:
            raise InputError("No frame of this video could be decoded (a truncated or damaged file?).")
        clip.indices = clip.indices[:len(clip.frames)]
        return clip
    finally:
        container.close()


def check_frames(num_frames) -> int:
    """An asked number of frames per clip, checked: a whole number from 1 to MAX_FRAMES."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise InputError(f"Frames per clip are 1 to {MAX_FRAMES} (got {num_frames!r}).")
    return num_frames


def sampled(info: ClipInfo, num_frames: int | None, sample) -> list:
    indices = [int(i) for i in (sample(info) if sample is not None else
                                uniform_indices(info.total_frames, min(num_frames, info.total_frames)))]
    if len(indices) > MAX_FRAMES:
        raise InputError(f"This clip would be sampled at {len(indices)} frames; the limit is {MAX_FRAMES}.")
    return indices


def read_animation(path, num_frames: int | None, sample) -> Clip:
    """An animated image through Pillow: its frame count, its frames' durations for the times and the rate."""
    try:
        image = Image.open(path)
        image.seek(0)
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InputError("This file is not a video or an animation Pillow can read.") from None
    with image:
        total = getattr(image, "n_frames", 1)
        durations = []
        for n in range(total):
            image.seek(n)
            durations.append(max(1, image.info.get("duration", 100)) / 1000)
        starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
        seconds = float(sum(durations))
        info = checked_info(ClipInfo(total_frames=total, fps=total / seconds, duration=seconds,
                                     width=image.width, height=image.height))
        clip = Clip(info, sampled(info, num_frames, sample))
        for index in clip.indices:
            image.seek(index)
            clip.frames.append(image.convert("RGB"))
            clip.times.append(float(starts[index]))
    return clip


def frame_at(container, stream, index: int, fps: float):
    """The `index`-th frame (constant rate: the first whose time reaches index / fps, from the stream's
    start), reached by seeking to the keyframe before it. None past the end of what the file holds."""
    import av
    base = stream.start_time or 0
    target = base + int(Fraction(index) / Fraction(fps).limit_denominator(1_000_000) / stream.time_base)
    half = int(Fraction(1, 2) / Fraction(fps).limit_denominator(1_000_000) / stream.time_base)
    try:
        container.seek(target, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts >= target - half:
                return frame
    except (av.error.FFmpegError, EOFError):
        return None
    return None


def frame_rotation(frame) -> int:
    """Degrees (counter-clockwise) the file's display matrix turns this frame by, as 0/90/180/270."""
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def upright(image: Image.Image, rotation: int) -> Image.Image:
    image = image.convert("RGB")
    if rotation in (90, 180, 270):
        return image.rotate(rotation, expand=True)
    return image


def is_clip_file(source, animations: bool = True) -> bool:
    """Whether `source` is a path to a video file (by its suffix), or with `animations` to an animated GIF or
    WebP (more than one frame)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    suffix = os.path.splitext(str(source))[1].lower()
    if suffix in CLIP_SUFFIXES:
        return True
    if not animations or suffix not in (".gif", ".webp"):
        return False
    try:
        with Image.open(source) as image:
            return getattr(image, "n_frames", 1) > 1
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
