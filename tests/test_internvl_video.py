"""A clip on InternVL3 (issue 36): frames sampled at the middle of equal segments (InternVLVideoProcessor's
initial shift), each frame one 448 px tile as the image processor prepares it (no tiling), a line "Frame k:
<img>...</img>" per frame in the prompt as InternVLProcessor writes it; Full = transformers' features and its
first answer = transformers' generate on the processor's prompt; VisionZip per frame = the image path on the same
frame; FastV and SGL run on a clip (turn 2's KV reuse: test_video_chat.py, every family). Float32, tiny twins,
clips the tests write with PyAV."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ChatSession, Turn, encode_image
from pipeline.video import probe
from tests.test_session import prompt
from tests.test_video import write_clip

pytest.importorskip("av")
Q1, Q2 = "What happens in the video?", "What colour is the square?"


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("iclip") / "squares.mp4", frames=45)


def processor_prompt(vlm, question: str, frames: int) -> list:
    """The ids InternVLProcessor gives a first question about a clip: the chat template's "<video>\\n" replaced by
    "Frame1: <img>" + 256 <IMG_CONTEXT> + "</img>", a line per frame (replace_video_token), then tokenized."""
    text = vlm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
                                             chat_template=vlm.family.chat_template, tokenize=False,
                                             add_generation_prompt=True)
    lines = "\n".join(f"Frame{i + 1}: <img>{'<IMG_CONTEXT>' * 256}</img>" for i in range(frames))
    return vlm.tokenizer.encode(text.replace("<video>", lines), add_special_tokens=False)


def test_frames_are_sampled_at_segment_middles(tiny_internvl, clip_path):
    s = ChatSession(tiny_internvl, method="full", max_new_tokens=2)
    s.add_video(clip_path)
    info = probe(clip_path)
    n, total = 8, info.total_frames
    want = [int(total / n / 2 + k * total / n) for k in range(n)]  # the middle of each of n equal segments
    assert s.state.clips[s.state.last_image_key]["indices"] == want


def test_full_prompt_and_answer_are_the_processors(tiny_internvl, clip_path):
    s = ChatSession(tiny_internvl, method="full", max_new_tokens=8)
    comp = s.add_video(clip_path, num_frames=4)
    assert comp.num_tokens == comp.full_tokens == 4 * 256 and len(comp.crops) == 4
    ids, _ = prompt(s, Q1)
    want = processor_prompt(tiny_internvl, Q1, 4)
    assert ids[-len(want):] == want  # (after the system prompt, where the session has one)
    frames = s.images.image(s.state, s.state.last_image_key)
    pixels = tiny_internvl.family.prepare_video(frames).pixel_values
    for k in range(4):  # each frame: the image processor on that 448x448 frame
        one = tiny_internvl.family.image_processor(images=[Image.fromarray(frames.pixels[k])], return_tensors="pt")
        assert torch.equal(pixels[k], one["pixel_values"][0])
    c = tiny_internvl.model.config
    with torch.no_grad():
        features = tiny_internvl.model.model.get_image_features(
            pixels, vision_feature_layer=c.vision_feature_layer,
            vision_feature_select_strategy=c.vision_feature_select_strategy).pooler_output.flatten(0, 1)
    assert torch.equal(comp.features, features)
    answer = s.ask(Q1)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        gen = tiny_internvl.model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=pixels,
                                           max_new_tokens=8, do_sample=False, eos_token_id=sorted(tiny_internvl.stop_ids),
                                           suppress_tokens=sorted(tiny_internvl.banned_ids),
                                           pad_token_id=tiny_internvl.tokenizer.pad_token_id)
    expected = [t for t in gen[0, len(ids):].tolist()
                if t not in tiny_internvl.stop_ids and t != tiny_internvl.tokenizer.pad_token_id]
    assert expected and answer == tiny_internvl.tokenizer.decode(expected, skip_special_tokens=True)


def test_visionzip_per_frame_is_the_image_path(tiny_internvl, clip_path):
    s = ChatSession(tiny_internvl, method="visionzip", max_new_tokens=2)
    comp = s.add_video(clip_path, num_frames=4)
    assert comp.num_tokens == 4 * 64
    frames = s.images.image(s.state, s.state.last_image_key)
    ids = s.plan(Turn(Q1, list(s.state.pending))).ids
    assert sum(t == tiny_internvl.image_token_id for t in ids) == 4 * 64
    assert tiny_internvl.tokenizer.decode(ids).count("Frame") == 4
    for k in range(4):
        alone = encode_image(tiny_internvl, Image.fromarray(frames.pixels[k]), "visionzip", 54, 10)
        assert len(alone.crops) == 1
        assert np.array_equal(alone.crops[0].kept, comp.crops[k].kept)
        assert np.array_equal(alone.crops[0].groups, comp.crops[k].groups)
        assert torch.allclose(alone.features, comp.features[64 * k:64 * (k + 1)], atol=1e-5)


def test_fastv_and_sgl_on_a_clip(tiny_internvl, tiny_internvl_large, clip_path):
    s = ChatSession(tiny_internvl_large, method="fastv", max_new_tokens=4, fastv_keep_ratio=0.5)
    s.add_video(clip_path, num_frames=2)
    s.ask(Q1)
    start, end = s.last_turn.guidance.image_spans[s.state.last_image_key]
    assert end - start == 2 * 256 and 0 < len(s.last_turn.guidance.kept) < 512
    s = ChatSession(tiny_internvl_large, method="sgl", small=tiny_internvl, max_new_tokens=4, early_exit=None,
                    sgl_tokens="visionzip")
    s.add_video(clip_path, num_frames=2)
    s.ask(Q1)
    large, small = s.compression(s.state.last_image_key), s.compression(s.state.last_image_key, lane="small")
    for a, b in zip(large.crops, small.crops):
        assert np.array_equal(a.kept, b.kept) and np.array_equal(a.groups, b.groups)
    assert s.ask(Q2)
