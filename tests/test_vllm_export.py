"""What the vLLM engine is given, checked without vLLM: the exported language model is the VLM's own
(transformers loads the export as a plain *ForCausalLM and, fed the prompt's embeddings, answers greedily
token for token as zipchat's decoder does), and bad prompts are refused before any engine sees them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import InputError, load_vlm
from pipeline.engines.vllm import allowed_ids, completion
from pipeline.engines.vllm_export import causal_lm_class, export_language_model, prompt_embeds
from pipeline.session import ChatSession
from pipeline.state import Turn

TWINS = ["tiny-llava-h32", "tiny-ov-h32", "tiny-internvl-h32"]


@pytest.fixture(scope="module", params=TWINS)
def twin(request):
    return load_vlm(request.param)


def greedy_from_embeds(model, embeds, allowed, stop_ids, n):
    """Brute force: the whole sequence re-run each step, argmax over the allowed ids."""
    mask = torch.full((model.config.vocab_size,), float("-inf"))
    mask[allowed] = 0
    h, out = embeds[None], []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(inputs_embeds=h).logits[0, -1].float() + mask
            token = int(logits.argmax())
            if token in stop_ids:
                break
            out.append(token)
            h = torch.cat([h, model.get_input_embeddings()(torch.tensor([[token]]))], 1)
    return out


def test_export_answers_as_zipchat(twin, photo, tmp_path):
    path = export_language_model(twin, tmp_path / twin.name)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(lm).__name__ == causal_lm_class(twin) and not hasattr(lm, "vision_tower")
    session = ChatSession(twin, method="visionzip", max_new_tokens=12)
    session.add_image(photo)
    for question in ("What is in the image?", "What colour is the cat?"):
        plan = session.plan(Turn(question=question, images=list(session.state.pending)))
        request = completion(twin, session.request(plan))
        assert request.embeds.shape == (len(plan.ids), twin.language_model.config.hidden_size)
        assert not set(request.allowed_ids) & twin.banned_ids and set(request.stop_ids) <= set(request.allowed_ids)
        reference = greedy_from_embeds(lm, request.embeds, request.allowed_ids, twin.stop_ids, 12)
        session.ask(question)
        assert twin.tokenizer.decode(reference, skip_special_tokens=True) == session.state.turns[-1].answer
        assert reference  # the answer is not empty: the comparison says something


def test_prompt_embeds_rows_are_tokens_and_features(twin, photo):
    session = ChatSession(twin, method="visionzip")
    comp = session.add_image(photo)
    plan = session.plan(Turn(question="Hi", images=list(session.state.pending)))
    embeds = prompt_embeds(twin, plan.ids, [comp.features])
    table = twin.model.get_input_embeddings().weight
    where = [i for i, t in enumerate(plan.ids) if t == twin.image_token_id]
    assert len(where) == comp.num_tokens
    assert torch.equal(embeds[where], comp.features.to(embeds.dtype))
    text = [i for i in range(len(plan.ids)) if i not in set(where)]
    assert torch.equal(embeds[text], table[[plan.ids[i] for i in text]].detach())


def test_bad_embeddings_are_refused(twin, photo):
    session = ChatSession(twin, method="visionzip")
    comp = session.add_image(photo)
    ids = session.plan(Turn(question="Hi", images=list(session.state.pending))).ids
    f = comp.features
    with pytest.raises(InputError, match="shape"):
        prompt_embeds(twin, ids, [f[:, :-1]])
    with pytest.raises(InputError, match="NaN"):
        prompt_embeds(twin, ids, [torch.where(torch.arange(len(f))[:, None] == 3, float("nan"), f)])
    with pytest.raises(InputError, match="placeholders"):
        prompt_embeds(twin, ids, [f[:-1]])
    assert len(allowed_ids(twin)) + len(twin.banned_ids) == twin.model.get_output_embeddings().weight.shape[0]


def test_qwen_is_refused(tiny_qwen, tmp_path):
    with pytest.raises(InputError, match="M-RoPE"):
        export_language_model(tiny_qwen, tmp_path / "qwen")
    assert not (tmp_path / "qwen").exists()


def test_an_export_is_remade_when_what_it_was_made_from_changes(tmp_path):
    """The export is keyed by the model, its dtype, its weights and zipchat's export version: the same model in
    another dtype, or other weights, is never served from an old export; the same one is not written again."""
    import json
    path = tmp_path / "export"
    bf16 = load_vlm("tiny-ov-h32", dtype=torch.bfloat16)
    export_language_model(bf16, path)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    written = (path / "model.safetensors").stat().st_mtime_ns
    export_language_model(bf16, path)
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # the same: kept
    f32 = load_vlm("tiny-ov-h32", dtype=torch.float32)
    export_language_model(f32, path)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(lm.lm_head.weight, f32.model.lm_head.weight)
    with torch.no_grad():
        f32.model.lm_head.weight[0, 0] += 1  # other weights (another checkpoint, another tiny recipe)
    try:
        export_language_model(f32, path)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).lm_head.weight,
                           f32.model.lm_head.weight)
    finally:
        with torch.no_grad():
            f32.model.lm_head.weight[0, 0] -= 1
    assert not list(tmp_path.glob("*.tmp"))
