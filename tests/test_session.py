"""Multi-turn chat: KV reuse gives the same greedy answers as recomputing everything, the full
method equals transformers' own forward, and images are encoded once."""

import pytest
import torch
import transformers
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from pipeline import ChatSession, Turn, compare_with_full
from pipeline.families.base import processor_image_defaults
from pipeline.generate import embed


def prompt(session, question):
    """(ids, image features) the session will send for `question`, built before asking it."""
    plan = session.plan(Turn(question, list(session.state.pending)))
    return plan.ids, [u.features for u in plan.slots if u.features is not None]

QUESTIONS = ["What is in the image?", "What colour is it?", "Describe it in one sentence."]


def run_turns(vlm, method, image, reuse_cache, image2=None):
    s = ChatSession(vlm, method=method, max_new_tokens=10, reuse_cache=reuse_cache)
    s.add_image(image)
    answers, stats = [], []
    for i, q in enumerate(QUESTIONS):
        if i == 1 and image2 is not None:
            s.add_image(image2)  # a second image mid-conversation
        answers.append(s.ask(q))
        stats.append(s.last_turn)
    return answers, stats, s


@pytest.mark.parametrize("method", ["full", "visionzip"])
def test_kv_reuse_equals_recompute(tiny_vlm, method, photo, photo2):
    reused, stats, _ = run_turns(tiny_vlm, method, photo, True, image2=photo2)
    recomputed, stats_re, _ = run_turns(tiny_vlm, method, photo, False, image2=photo2)
    assert all(s.new_tokens >= 3 for s in stats)  # the answers are not empty
    assert reused == recomputed
    assert [s.cache_reused for s in stats] == [False, True, True]
    assert not any(s.cache_reused for s in stats_re)
    # turn 3 prefills only text on top of the cache (the latest answer as the chat template renders it,
    # and the new question); the recompute prefills everything
    assert stats[2].prefill_tokens <= stats[1].new_tokens + 40 < stats_re[2].prefill_tokens == stats_re[2].prompt_tokens
    assert stats[2].prompt_tokens == stats_re[2].prompt_tokens


def test_full_first_turn_equals_transformers_generate(tiny_vlm, photo):
    """Our own decode loop vs HF `generate` on HF's own image path (pixel_values -> packed features)."""
    s = ChatSession(tiny_vlm, method="full", max_new_tokens=10)
    s.add_image(photo)
    ids, _ = prompt(s, QUESTIONS[0])
    answer = s.ask(QUESTIONS[0])
    processor = getattr(transformers, PROCESSOR_MAPPING_NAMES[tiny_vlm.family.model_type])  # its image defaults apply
    out = tiny_vlm.image_processor(images=[photo], return_tensors="pt", **processor_image_defaults(processor))
    kwargs = {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    if "image_grid_thw" in kwargs:  # Qwen2.5-VL's processor also says which tokens are the image's (for M-RoPE)
        kwargs["mm_token_type_ids"] = (torch.tensor([ids]) == tiny_vlm.image_token_id).int()
    with torch.no_grad():
        gen = tiny_vlm.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=10, do_sample=False, eos_token_id=sorted(tiny_vlm.stop_ids),
                                      suppress_tokens=sorted(tiny_vlm.banned_ids),
                                      pad_token_id=tiny_vlm.tokenizer.pad_token_id, **kwargs)
    expected = gen[0, len(ids):].tolist()
    expected = [t for t in expected if t not in tiny_vlm.stop_ids and t != tiny_vlm.tokenizer.pad_token_id]
    assert answer == tiny_vlm.tokenizer.decode(expected, skip_special_tokens=True)
    assert s.last_turn.new_tokens == len(expected)


def test_visionzip_turn_equals_generate_on_embeddings(tiny_vlm, photo):
    """Second turn with VisionZip tokens vs HF `generate` on the whole conversation's embeddings."""
    if tiny_vlm.family.position_rows > 1:
        pytest.skip("generate() cannot be given M-RoPE positions for a compressed image: test_qwen.py checks "
                    "this turn against transformers' language model on explicit positions")
    s = ChatSession(tiny_vlm, method="visionzip", max_new_tokens=8)
    s.add_image(photo)
    s.ask(QUESTIONS[0])
    ids, features = prompt(s, QUESTIONS[1])
    answer = s.ask(QUESTIONS[1])
    assert s.last_turn.cache_reused
    with torch.no_grad():
        gen = tiny_vlm.model.generate(inputs_embeds=embed(tiny_vlm, ids, features), max_new_tokens=8, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      eos_token_id=sorted(tiny_vlm.stop_ids), suppress_tokens=sorted(tiny_vlm.banned_ids),
                                      pad_token_id=tiny_vlm.tokenizer.pad_token_id)
    expected = [t for t in gen[0].tolist() if t not in tiny_vlm.stop_ids and t != tiny_vlm.tokenizer.pad_token_id]
    assert answer == tiny_vlm.tokenizer.decode(expected, skip_special_tokens=True)


def test_encoder_runs_once_and_never_past_feature_layer(tiny_vlm, photo):
    layers = tiny_vlm.family.tower_layers(tiny_vlm.model)
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, layer in enumerate(layers)]
    try:
        s = ChatSession(tiny_vlm, method="visionzip", max_new_tokens=4)
        n_crops = len(s.add_image(photo).crops)
        s.ask(QUESTIONS[0])
        after_first = list(calls)
        s.ask(QUESTIONS[1])
        assert calls == after_first  # turn 2: no vision layer ran
        s.add_image(photo)  # same content again: served from the compress-once cache
        assert calls == after_first
        s.set_method("visionzip", 108, 20)  # a new budget re-compresses once, at the next turn
        s.ask(QUESTIONS[2])
        assert s.last_turn.images_encoded == 1
        # only the text before the image is still valid in the KV cache: the rest is recomputed
        assert 128 < s.last_turn.prefill_tokens < s.last_turn.prompt_tokens
    finally:
        for h in hooks:
            h.remove()
    run = tiny_vlm.family.num_layers_to_run
    # vision layers run batched over crops: one call per layer per encode
    assert calls[:run] == [2] * run and all(c == 0 for c in calls[run:])
    if tiny_vlm.family.name in ("llava", "llava_next"):
        assert run == len(layers) - 1  # feature layer -2: the last layer never runs
    # the crops each family's processor makes of this 451x300 photo: a 336 px centre square (LLaVA-1.5);
    # the base image + 1x2 tiles of 384 (OneVision) or 336 (NeXT, whose 672x336 pinpoint fits best);
    # 2x3 tiles of 448 px (the closest aspect ratio to 3:2) + a thumbnail (InternVL)
    expected = {"llava": (1, 1, 1), "llava_onevision": (1, 2, 3), "llava_next": (1, 2, 3), "internvl": (2, 3, 7),
                "qwen2_5_vl": (1, 1, 1)}  # Qwen2.5-VL: the whole image at its own resolution
    rows, cols = tiny_vlm.family.prepare(photo).tile_grid
    assert (rows, cols, n_crops) == expected[tiny_vlm.family.name]


def test_text_only_and_stats(tiny_llava):
    s = ChatSession(tiny_llava, max_new_tokens=6)
    s.ask("Hello there")
    t = s.last_turn
    assert t.visual_tokens == 0 and t.new_tokens > 0 and t.ttft_s > 0 and t.prefill_s > 0
    assert t.kv_cache_bytes > 0 and t.device == "cpu" and t.dtype == "float32"
    s.ask("And again")
    assert s.last_turn.cache_reused


def test_stop_keeps_the_partial_answer(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=50)
    s.add_image(photo)
    pieces = []
    for delta in s.ask_stream(QUESTIONS[0]):
        pieces.append(delta)
        if len(pieces) == 2:
            s.stop()
    assert s.last_turn.stopped and s.last_turn.new_tokens <= 3
    s.ask(QUESTIONS[1])  # the session goes on, reusing the cache
    assert s.last_turn.cache_reused and not s.last_turn.stopped


def test_kv_cache_bytes_shrink_with_visionzip(tiny_llava, photo):
    sizes = {}
    for method in ("full", "visionzip"):
        s = ChatSession(tiny_llava, method=method, max_new_tokens=2)
        s.add_image(photo)
        s.ask(QUESTIONS[0])
        cfg = tiny_llava.language_model.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
        assert s.last_turn.kv_cache_bytes == per_token * (s.last_turn.prompt_tokens + s.last_turn.new_tokens - 1)
        sizes[method] = s.last_turn.kv_cache_bytes
    assert sizes["visionzip"] < 0.3 * sizes["full"]


def test_compare_with_full_reanswers_last_question(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=8)
    s.add_image(photo)
    s.ask(QUESTIONS[0])
    answer = s.ask(QUESTIONS[1])
    results = compare_with_full(s)
    # recomputed from scratch with the same method: the same greedy answer as the cached turn
    assert results["visionzip"][0] == answer and not results["visionzip"][1].cache_reused
    full_answer, full_stats = results["full"]
    assert full_stats.visual_tokens == 576 and results["visionzip"][1].visual_tokens == 64
    reference = ChatSession(tiny_llava, method="full", max_new_tokens=8, reuse_cache=False)
    reference.state.images = dict(s.state.images)
    reference.state.turns = list(s.state.turns[:1])  # same history (the first turn's VisionZip answer)
    assert full_answer == reference.ask(QUESTIONS[1])
    assert s.ask(QUESTIONS[2]) and s.last_turn.cache_reused  # the session itself is untouched
