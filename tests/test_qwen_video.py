"""A clip on Qwen2.5-VL (issue 36): frames sampled as its video processor samples them (pairs: temporal patch 2),
patches laid out as its processor lays them out, each temporal group one crop; Full = transformers'
get_video_features and its first answer = transformers' generate on its own video path; M-RoPE time positions =
get_rope_index (text after a clip: Qwen's and vLLM's rule); VisionZip per group = the image path on the same
frame; FastV and SGL run on a clip (turn 2's KV reuse: test_video_chat.py, every family). Float32, tiny twins,
clips the tests write with PyAV."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ChatSession, Turn, encode_image
from pipeline.video import ClipInfo, Frames, probe
from tests.test_session import prompt
from tests.test_video import write_clip

pytest.importorskip("av")
Q1, Q2 = "What happens in the video?", "What colour is the square?"
W, H = 224, 168  # 8 x 6 units of 28 px a frame


def square(i: int) -> np.ndarray:
    """Frame i: a grey background and a coloured square that moves 9 px right a frame."""
    a = np.full((H, W, 3), 40, np.uint8)
    x = (9 * i) % (W - 40)
    a[60:100, x:x + 40] = ((60 + 50 * i) % 256, (220 - 35 * i) % 256, (30 + 80 * i) % 256)
    return a


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("qclip") / "squares.mp4", frames=40, make=square)


@pytest.fixture(scope="module")
def slow_clip(tmp_path_factory):
    """1 frame a second: 8 frames of 20 s are 5 s a temporal group, time positions 10 apart (past the grid's 8)."""
    return write_clip(tmp_path_factory.mktemp("qslow") / "slow.mp4", frames=20, fps=1, gop=4, make=square)


def test_frames_are_sampled_as_its_processor_samples_them(tiny_qwen, clip_path):
    """A number of frames: rounded to pairs, at arange(0, total, total / n).int(); on a GPU, 2 a second (its fps
    rule: total / fps x 2 frames, within [4, 64], floored to pairs). The sampled fps is transformers'."""
    family, info = tiny_qwen.family, probe(clip_path)
    s = ChatSession(tiny_qwen, method="full", max_new_tokens=2)
    for asked, n in ((4, 4), (5, 4), (7, 8), (3, 4)):
        s.add_video(clip_path, num_frames=asked)
        clip = s.state.clips[s.state.last_image_key]
        assert clip["indices"] == [int(i) for i in np.arange(0, 40, 40 / n, dtype=np.float32).astype(int)]
        assert clip["sampled_fps"] == pytest.approx(n / 40 * 10) and clip["crops"] == n // 2
    wanted = math.floor(min(max(info.total_frames / info.fps * 2, 4), min(64, info.total_frames)) / 2) * 2
    assert wanted == 8
    gpu = family.video_sample(None, on_gpu=True)[1](info)
    assert gpu.tolist() == [int(i) for i in np.arange(0, 40, 40 / wanted, dtype=np.float32).astype(int)]
    long = ClipInfo(total_frames=30 * 600, fps=30, duration=600, width=W, height=H)  # 10 minutes: the 64-frame cap
    assert len(family.video_sample(None, on_gpu=True)[1](long)) == 64


def brute_force_patches(frames: np.ndarray, mean, std) -> tuple:
    """The video processor's layout, by hand: frames (F, h, w, 3) uint8 -> rescaled, normalised; an odd last frame
    repeated; row ((t * R + r) * C + c) * 4 + 2i + j holds the 14 px patch (i, j) of unit (r, c) of frame pair t,
    flattened as (channel, frame of the pair, y, x). -> ((rows, 1176), (T, h / 14, w / 14))."""
    x = (frames.astype(np.float64) / 255 - np.array(mean)) / np.array(std)  # (F, h, w, 3)
    if len(x) % 2:
        x = np.concatenate([x, x[-1:]])
    T, h, w = len(x) // 2, x.shape[1] // 14, x.shape[2] // 14
    rows = []
    for t in range(T):
        for r in range(h // 2):
            for c in range(w // 2):
                for i in range(2):
                    for j in range(2):
                        y0, x0 = (2 * r + i) * 14, (2 * c + j) * 14
                        patch = x[2 * t:2 * t + 2, y0:y0 + 14, x0:x0 + 14]  # (2, 14, 14, 3)
                        rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows), (T, h, w)


@pytest.mark.parametrize("count", [4, 3])
def test_patches_and_token_count_are_its_processors(tiny_qwen, clip_path, count):
    s = ChatSession(tiny_qwen, method="full", max_new_tokens=2)
    s.add_video(clip_path, num_frames=4)
    frames = s.images.image(s.state, s.state.last_image_key)
    frames = Frames(frames.pixels[:count], frames.shown, frames.times[:count], frames.sampled_fps)
    ip = tiny_qwen.family.image_processor
    smart_resize = __import__(type(ip).__module__, fromlist=["smart_resize"]).smart_resize
    h, w = smart_resize(H, W, factor=28, min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge)
    assert frames.pixels.shape[1:3] == (h, w) == (H, W)
    prepared = tiny_qwen.family.prepare_video(frames)
    want, grid = brute_force_patches(frames.pixels, ip.image_mean, ip.image_std)
    assert prepared.extra["grid_thw"].tolist() == [list(grid)] and len(prepared.crops) == grid[0] == 2
    np.testing.assert_allclose(prepared.pixel_values.numpy(), want, atol=2e-6)
    comp = encode_image(tiny_qwen, frames, "full")
    assert comp.num_tokens == comp.full_tokens == grid[0] * grid[1] * grid[2] // 4


def test_full_is_transformers_video_path(tiny_qwen, clip_path):
    """Full's tokens = get_video_features; its first answer = transformers' generate with pixel_values_videos,
    video_grid_thw and second_per_grid_ts (the processor's temporal patch / sampled fps)."""
    s = ChatSession(tiny_qwen, method="full", max_new_tokens=8)
    comp = s.add_video(clip_path, num_frames=4)
    frames = s.images.image(s.state, s.state.last_image_key)
    prepared = tiny_qwen.family.prepare_video(frames)
    with torch.no_grad():
        want = tiny_qwen.model.model.get_video_features(prepared.pixel_values, prepared.extra["grid_thw"]).pooler_output[0]
    assert torch.equal(comp.features, want) and comp.seconds_per_crop == pytest.approx(2 / frames.sampled_fps)
    ids, _ = prompt(s, Q1)
    answer = s.ask(Q1)
    video_id = tiny_qwen.model.config.video_token_id
    ids = torch.tensor([[video_id if t == tiny_qwen.image_token_id else t for t in ids]])
    with torch.no_grad():
        gen = tiny_qwen.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == video_id).int() * 2,
            pixel_values_videos=prepared.pixel_values, video_grid_thw=prepared.extra["grid_thw"],
            second_per_grid_ts=torch.tensor([comp.seconds_per_crop]), max_new_tokens=8, do_sample=False,
            eos_token_id=sorted(tiny_qwen.stop_ids), suppress_tokens=sorted(tiny_qwen.banned_ids),
            pad_token_id=tiny_qwen.tokenizer.pad_token_id)
    expected = [t for t in gen[0, ids.shape[1]:].tolist()
                if t not in tiny_qwen.stop_ids and t != tiny_qwen.tokenizer.pad_token_id]
    assert expected and answer == tiny_qwen.tokenizer.decode(expected, skip_special_tokens=True)


def hf_video_positions(vlm, ids, comp):
    """transformers' get_rope_index on the uncompressed sequence, the clip's tokens as video tokens."""
    video_id = vlm.model.config.video_token_id
    ids_t = torch.tensor([[video_id if t == vlm.image_token_id else t for t in ids]])
    T = len(comp.crops)
    rows, cols = comp.crops[0].grid
    return vlm.model.model.get_rope_index(ids_t, (ids_t == video_id).int() * 2,
                                          video_grid_thw=torch.tensor([[T, 2 * rows, 2 * cols]]),
                                          second_per_grid_ts=torch.tensor([comp.seconds_per_crop]))[0][:, 0]


@pytest.mark.parametrize("which", ["clip_path", "slow_clip"])
def test_time_positions(tiny_qwen, which, request):
    """Full: the clip's tokens and the text before it at get_rope_index's positions (time = floor(group x
    tokens_per_second x seconds a group)); the text after it at the largest position so far + 1 (Qwen's rule and
    vLLM's; transformers 5 goes on at p + max(rows, cols), which agrees while the time positions stay below that:
    the first clip). VisionZip: each kept unit at its uncompressed position."""
    path = request.getfixturevalue(which)
    layouts = {}
    for method in ("full", "visionzip"):
        s = ChatSession(tiny_qwen, method=method, max_new_tokens=4)
        s.add_video(path, num_frames=8 if which == "slow_clip" else 4)
        plan = s.plan(Turn(Q1, list(s.state.pending)))
        layouts[method] = (plan.ids, tiny_qwen.family.positions(plan.ids, plan.slots), plan.compressions[0])
    ids, pos, comp = layouts["full"]
    start = ids.index(tiny_qwen.image_token_id)
    end = start + comp.num_tokens
    want = hf_video_positions(tiny_qwen, ids, comp)
    interval = 2 * comp.seconds_per_crop
    assert (interval * (len(comp.crops) - 1) >= max(comp.crops[0].grid)) == (which == "slow_clip")
    assert torch.equal(pos[:, :end], want[:, :end])
    after = int(pos[:, :end].max()) + 1 + torch.arange(len(ids) - end)
    assert torch.equal(pos[:, end:], after.expand(3, -1))
    if which == "clip_path":
        assert torch.equal(pos, want)
    zids, zpos, zcomp = layouts["visionzip"]
    zstart = zids.index(tiny_qwen.image_token_id)
    rows, cols = zcomp.crops[0].grid
    units = zcomp.token_map[:, 0] * rows * cols + zcomp.token_map[:, 1]  # index in the uncompressed clip
    assert (np.diff(units) > 0).all()
    assert torch.equal(zpos[:, zstart:zstart + len(units)], pos[:, start + torch.as_tensor(units)])
    assert torch.equal(zpos[:, zstart + len(units):], pos[:, end:])


def test_visionzip_per_group_is_the_image_path(tiny_qwen, clip_path):
    """A temporal group whose two frames are one frame = that frame as an image: the same pixel_values, the same
    kept and merged units at the same share of the group's units, the same tokens."""
    s = ChatSession(tiny_qwen, method="visionzip", max_new_tokens=2)
    s.add_video(clip_path, num_frames=4)
    frames = s.images.image(s.state, s.state.last_image_key)
    pairs = Frames(np.repeat(frames.pixels[::2], 2, axis=0), frames.shown, frames.times, frames.sampled_fps)
    clip = encode_image(tiny_qwen, pairs, "visionzip", 54, 10)
    video = tiny_qwen.family.prepare_video(pairs).pixel_values.view(2, -1, 1176)
    per_group = clip.num_tokens // 2
    for t in range(2):
        image = Image.fromarray(pairs.pixels[2 * t])
        assert torch.equal(tiny_qwen.family.prepare(image).pixel_values, video[t])
        alone = encode_image(tiny_qwen, image, "visionzip", 54, 10)
        assert alone.num_tokens == per_group
        assert np.array_equal(alone.crops[0].kept, clip.crops[t].kept)
        assert np.array_equal(alone.crops[0].groups, clip.crops[t].groups)
        assert torch.allclose(alone.features, clip.features[per_group * t:per_group * (t + 1)], atol=1e-5)


def test_fastv_and_sgl_on_a_clip(tiny_qwen, tiny_qwen_large, clip_path):
    """FastV prunes the clip's tokens inside the LLM; SGL's small twin sees the same frames and sends the same
    units per temporal group."""
    s = ChatSession(tiny_qwen_large, method="fastv", max_new_tokens=4, fastv_keep_ratio=0.5)
    s.add_video(clip_path, num_frames=4)
    s.ask(Q1)
    start, end = s.last_turn.guidance.image_spans[s.state.last_image_key]
    assert end - start == 2 * 6 * 8 and 0 < len(s.last_turn.guidance.kept) < end - start
    s = ChatSession(tiny_qwen_large, method="sgl", small=tiny_qwen, max_new_tokens=4, early_exit=None,
                    sgl_tokens="visionzip")
    s.add_video(clip_path, num_frames=4)
    s.ask(Q1)
    large, small = s.compression(s.state.last_image_key), s.compression(s.state.last_image_key, lane="small")
    assert len(large.crops) == len(small.crops) == 2 and large.num_tokens == small.num_tokens
    for a, b in zip(large.crops, small.crops):
        assert np.array_equal(a.kept, b.kept) and np.array_equal(a.groups, b.groups)
    assert s.ask(Q2)
