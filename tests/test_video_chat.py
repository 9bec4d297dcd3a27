"""A clip in the chat (issue 36, LLaVA-OneVision): sampled and compressed once, each frame a crop, then talked
about over several turns. Full sends exactly transformers' video features (get_video_features: the tower per
frame, 2x2 pooling, one newline) and its first answer equals transformers' generate on its own video path;
VisionZip per frame equals the image path on the same frame; turn 2 reuses the KV cache and answers as
recomputing does; families without video say so (float32, tiny twins, clips the tests write)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ChatSession, InputError
from pipeline.compress import encode_image
from pipeline.video import Frames, read_clip
from tests.test_session import prompt
from tests.test_video import write_clip

pytest.importorskip("av")
Q1, Q2 = "What happens in the video?", "What colour is the square?"


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "squares.mp4", frames=45)


def brute_force_pixels(path, n: int) -> torch.Tensor:
    """The checkpoint's video_processor/preprocessor_config.json, by hand: each sampled frame resized to 384x384
    (bicubic), rescaled by 1/255, normalised with mean = std = 0.5 -> (F, 3, 384, 384)."""
    frames = read_clip(path, n).frames
    a = np.stack([np.asarray(f.resize((384, 384), Image.BICUBIC)) for f in frames]).astype(np.float32)
    return (torch.from_numpy(a).permute(0, 3, 1, 2) / 255 - 0.5) / 0.5


def test_full_is_transformers_video_features(tiny_ov, clip_path):
    s = ChatSession(tiny_ov, method="full", max_new_tokens=4)
    comp = s.add_video(clip_path, num_frames=4)
    assert comp.num_tokens == comp.full_tokens == 4 * 14 * 14 + 1 and len(comp.crops) == 4
    frames = s.images.image(s.state, s.state.last_image_key)
    pixels = tiny_ov.family.prepare_video(frames).pixel_values
    assert torch.allclose(pixels, brute_force_pixels(clip_path, 4), atol=1e-6)
    c = tiny_ov.model.config
    with torch.no_grad():
        want = tiny_ov.model.model.get_video_features(
            pixel_values_videos=pixels[None], vision_feature_layer=c.vision_feature_layer,
            vision_feature_select_strategy=c.vision_feature_select_strategy).pooler_output[0]
    assert torch.equal(comp.features, want)
    assert comp.token_map[-1].tolist() == [3, -1, -1] and (comp.token_map[:-1, 1] >= 0).all()
    assert s.state.clips[s.state.last_image_key]["indices"] == [0, 11, 22, 33]


def test_video_processor_where_it_runs(tiny_ov, clip_path):
    """transformers' own LlavaOnevisionVideoProcessor with the checkpoint's settings (it needs torchvision; its
    resize is torchvision's bicubic, a few levels off Pillow's)."""
    pytest.importorskip("torchvision")
    from transformers import LlavaOnevisionVideoProcessor
    processor = LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, resample=3)
    frames = read_clip(clip_path, 4).frames
    want = processor(videos=[np.stack([np.asarray(f) for f in frames])], return_tensors="pt")["pixel_values_videos"][0]
    assert (want - brute_force_pixels(clip_path, 4)).abs().max() <= 4 / 127.5


def test_full_answer_equals_transformers_generate_on_video(tiny_ov, clip_path):
    s = ChatSession(tiny_ov, method="full", max_new_tokens=8)
    s.add_video(clip_path, num_frames=4)
    ids, _ = prompt(s, Q1)
    pixels = tiny_ov.family.prepare_video(s.images.image(s.state, s.state.last_image_key)).pixel_values
    answer = s.ask(Q1)
    video_id = tiny_ov.model.config.video_token_index
    ids = [video_id if t == tiny_ov.image_token_id else t for t in ids]  # the processor's <video> tokens
    with torch.no_grad():
        gen = tiny_ov.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     pixel_values_videos=pixels[None], max_new_tokens=8, do_sample=False,
                                     eos_token_id=sorted(tiny_ov.stop_ids), suppress_tokens=sorted(tiny_ov.banned_ids),
                                     pad_token_id=tiny_ov.tokenizer.pad_token_id)
    expected = [t for t in gen[0, len(ids):].tolist() if t not in tiny_ov.stop_ids and t != tiny_ov.tokenizer.pad_token_id]
    assert answer == tiny_ov.tokenizer.decode(expected, skip_special_tokens=True) and expected


def test_visionzip_per_frame_is_the_image_path(tiny_ov, clip_path):
    """Frame k of a clip under VisionZip = the same frame as a 384x384 image (one tile: the base image) under
    VisionZip: the same pixels, the same kept patches, the same tokens."""
    s = ChatSession(tiny_ov, method="visionzip", max_new_tokens=4)
    comp = s.add_video(clip_path, num_frames=4)
    assert comp.num_tokens == 4 * 64
    frames = s.images.image(s.state, s.state.last_image_key)
    for k in range(4):
        image = Image.fromarray(frames.pixels[k])
        alone = encode_image(tiny_ov, image, "visionzip", 54, 10, max_tiles=1)
        assert torch.equal(tiny_ov.family.prepare(image, 1).pixel_values[0], tiny_ov.family.prepare_video(frames).pixel_values[k])
        assert np.array_equal(alone.crops[0].kept, comp.crops[k].kept)
        assert np.array_equal(alone.crops[0].groups, comp.crops[k].groups)
        assert torch.allclose(alone.features[:64], comp.features[64 * k:64 * (k + 1)], atol=1e-5)


@pytest.mark.parametrize("method", ["visionzip", "full"])
@pytest.mark.parametrize("family", ["tiny_ov", "tiny_qwen", "tiny_internvl"])
def test_turn_two_reuses_the_cache_and_equals_recomputing(family, clip_path, method, request):
    """Every family that takes clips: turn 2 on the reused KV cache answers as recomputing the conversation does."""
    vlm, answers = request.getfixturevalue(family), []
    for reuse in (True, False):
        s = ChatSession(vlm, method=method, max_new_tokens=8, reuse_cache=reuse)
        s.add_video(clip_path, num_frames=4)
        s.ask(Q1)
        encoded = s.last_turn.images_encoded
        answers.append(s.ask(Q2))
        assert s.last_turn.cache_reused == reuse and s.last_turn.images_encoded == 0 and encoded == 1
    assert answers[0] == answers[1]


def test_families_without_video_say_so(tiny_llava, clip_path):
    s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=4)
    with pytest.raises(InputError, match="not video"):
        s.add_video(clip_path)
    assert s.state.images == {} and s.state.pending == [] and s.state.clips == {}


def test_a_refused_clip_changes_nothing(tiny_ov, clip_path, tmp_path):
    s = ChatSession(tiny_ov, method="visionzip", max_new_tokens=4)
    s.add_video(clip_path, num_frames=2)
    s.ask(Q1)
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    for bad, n in ((junk, 4), (clip_path, 0), (clip_path, 65)):
        with pytest.raises(InputError):
            s.add_video(bad, num_frames=n)
    assert len(s.state.clips) == 1 and s.state.pending == []
    assert s.ask(Q2) and s.last_turn.cache_reused
    assert isinstance(s.images.image(s.state, s.state.last_image_key), Frames)


def test_fastv_and_sgl_on_a_clip(tiny_ov, tiny_ov_large, clip_path):
    """The in-LLM methods on a clip: FastV prunes the clip's tokens inside the LLM (its guidance spans the clip's
    785 tokens); SGL's small model sees the same frames, with VisionZip's tokens the same units as the large."""
    s = ChatSession(tiny_ov_large, method="fastv", max_new_tokens=4, fastv_keep_ratio=0.5)
    s.add_video(clip_path, num_frames=4)
    s.ask(Q1)
    t, key = s.last_turn, s.state.last_image_key
    start, end = t.guidance.image_spans[key]
    assert end - start == 785 and 0 < len(t.guidance.kept) < 785
    s = ChatSession(tiny_ov_large, method="sgl", small=tiny_ov, max_new_tokens=4, early_exit=None,
                    sgl_tokens="visionzip")
    s.add_video(clip_path, num_frames=4)
    s.ask(Q1)
    large, small = s.compression(s.state.last_image_key), s.compression(s.state.last_image_key, lane="small")
    assert len(small.crops) == len(large.crops) == 4 and small.num_tokens == large.num_tokens == 256
    for a, b in zip(large.crops, small.crops):
        assert np.array_equal(a.kept, b.kept) and np.array_equal(a.groups, b.groups)
    assert s.last_turn.guidance is not None and s.ask(Q2)


def test_the_frames_per_clip_setting(tiny_ov, clip_path):
    """`clip_frames` (the app's --clip-frames / ZIPCHAT_CLIP_FRAMES): a clip sent like an image (the chat's upload)
    is sampled at that many frames; add_video's own number wins."""
    s = ChatSession(tiny_ov, method="visionzip", max_new_tokens=2, clip_frames=3)
    s.add_image(str(clip_path))
    assert len(s.state.clips[s.state.last_image_key]["indices"]) == 3
    s.add_video(clip_path, num_frames=2)
    assert len(s.state.clips[s.state.last_image_key]["indices"]) == 2
    assert len(ChatSession(tiny_ov).add_video(clip_path).crops) == 8  # (a CPU's default)
