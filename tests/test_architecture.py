"""The structure: no import circle; a method is one record, registered by one file, and everything else reads
the record (a throw-away method written here, in this file only, shows up wherever the built-in ones do);
an engine is anything with `stream(request, usage)` and `max_model_len()`."""

import pytest
import torch

from pipeline import ChatSession, InputError
from pipeline.compare import compare, overlap, overlap_markdown
from pipeline.engines.vllm import completion
from pipeline.generate import embed_token, forward, new_cache
from pipeline.heatmap import describe, render_map
from pipeline.methods import registry
from pipeline.methods.base import CropInput, Pick, pruned, ranked
from tests.appclient import CAT, VISIONZIP, compare_rows, stat
from tests.import_graph import cycles, graph


def test_no_import_circle():
    edges = graph()
    assert "pipeline.config" in edges and "pipeline.methods.registry" in edges  # (the graph reads the project)
    assert cycles(edges) == []


def test_the_lowest_floor_imports_nothing_above_it():
    edges = graph()
    assert edges["pipeline.config"] <= {"pipeline.errors"}
    assert edges["pipeline.methods.registry"] <= {"pipeline.errors"}
    assert not any(m.startswith("ui") or m == "app" for name in edges if name.startswith("pipeline")
                   for m in edges[name])  # the algorithms never import the page


# ---- a throw-away compress-once method: the patches VisionZip's attention ranks lowest ------------------------

def least_attended(crop: CropInput) -> Pick:
    """The `budget` patches with the lowest attention score, sent as themselves in index order."""
    return pruned(crop, ranked(-crop.patch_scores)[:crop.budget], scores=crop.patch_scores)


@pytest.fixture
def throwaway():
    record = registry.register(registry.Method("least", "Least attended", registry.COMPRESS_ONCE, pick=least_attended,
                                               words=registry.MapWords(tokens="least attended patches")))
    yield record
    registry.unregister("least")


def brute_force_least(comp, crop: int, budget: int) -> set:
    """The `budget` lowest-scoring patches of a crop, one comparison at a time (ties to the lowest index)."""
    scores = list(comp.crops[crop].scores)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return set(order[:budget])


def test_a_method_registered_at_run_time_compresses_answers_and_is_compared(throwaway, tiny_llava, photo):
    s = ChatSession(tiny_llava, method="least", max_new_tokens=4)
    comp = s.add_image(photo)
    assert comp.num_tokens == 64 and set(comp.crops[0].kept.tolist()) == brute_force_least(comp, 0, 64)
    assert comp.caption() == "Least attended: 64 least attended patches = 64 of 576 visual tokens (11%)"
    s.ask("What is it?")
    s.ask("And again?")
    assert s.last_turn.cache_reused and s.last_turn.images_encoded == 0  # compressed once, KV reused
    results = compare(s, ["least", "visionzip", "full"], max_new_tokens=3)
    assert [m for m, _, _ in results] == ["least", "visionzip", "full"]
    names, matrix = overlap(s, results)
    assert names == ["least", "visionzip"] and matrix[0][0] == 1.0
    assert "| Least attended |" in overlap_markdown(names, matrix, ["least", "visionzip", "full"])
    kept, dropped = int(comp.crops[0].kept[0]), int(next(i for i in range(576) if i not in set(comp.crops[0].kept)))
    assert "kept: sent as itself" in describe(comp, 0, kept) and "not sent" in describe(comp, 0, dropped)
    random = s.compression(s.state.last_image_key, method="random")  # the same legend, other patches kept
    kept_map, random_map = render_map(photo, comp, "kept"), render_map(photo, random, "kept")
    assert kept_map.size == random_map.size and kept_map.tobytes() != random_map.tobytes()


def test_a_method_registered_at_run_time_is_offered_by_the_app(throwaway, tiny_llava):
    """The app's method choice, Compare's choice, its stats and its Compare table, from the record alone."""
    import app
    from ui.handlers import Handlers
    demo = app.build_demo(tiny_llava, banner="offline", max_new_tokens=3)
    radios = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in ("method", "compare-methods")}
    assert ("Least attended", "Least attended") in radios["method"].choices
    assert ("Least attended", "least") in radios["compare-methods"].choices
    h = Handlers(tiny_llava, max_new_tokens=3)
    settings = ("Least attended",) + VISIONZIP[1:]
    history, _, state, _ = h.add_message([], {"text": "What is it?", "files": [CAT]}, None, *settings)
    *_, last = h.respond(history, state, "kept")
    history, state, stats, shown, caption, _ = last
    assert stat(stats, "visual tokens to the LLM") == "64 of 576" and caption.startswith("Least attended: 64")
    assert stat(stats, "model") == f"{tiny_llava.name} (least)" and history[-1]["role"] == "assistant"
    *_, (table, answers, maps, overlap_table) = h.compare_answers(state, ["least", "full"])
    assert list(compare_rows(table)) == ["Least attended", "Full"] and "**Least attended:**" in answers
    assert len(maps) == 2 and maps[0][1].startswith("Least attended: 64 of")


# ---- a throw-away in-LLM method: the plain answer, with a row of its own in the stats --------------------------

def test_an_in_llm_method_registered_at_run_time_answers_and_shows_its_rows(tiny_llava, photo):
    from ui.text import format_stats

    def answer(ctx):
        ctx.stats.timings["plain_s"] = 0.0
        return (yield from ctx.answer(ctx.request()))
    registry.register(registry.Method("plain", "Plain", registry.IN_LLM, answer=answer, images="full",
                                      engines=("transformers",), stats_rows=lambda t: [("Plain: rows", "one")]))
    try:
        s, reference = ChatSession(tiny_llava, method="plain", max_new_tokens=5), ChatSession(tiny_llava,
                                                                                             max_new_tokens=5)
        for session in (s, reference):
            session.add_image(photo)
        assert s.ask("What is it?") == reference.ask("What is it?")  # Full's tokens, the plain answer
        assert "plain_s" in s.last_turn.timings and "| Plain: rows | one |" in format_stats(s.last_turn)
        assert s.last_turn.visual_tokens == 576
    finally:
        registry.unregister("plain")
    with pytest.raises(InputError, match="Unknown method 'plain'"):
        s.set_method("plain")


def test_a_method_record_must_carry_what_its_kind_needs():
    with pytest.raises(ValueError, match="needs its pick"):
        registry.register(registry.Method("nopick", "No pick", registry.COMPRESS_ONCE))
    with pytest.raises(ValueError, match="unknown kind"):
        registry.register(registry.Method("odd", "Odd", "sometimes"))
    assert "nopick" not in registry.names() and "odd" not in registry.names()


# ---- engines: anything with stream(request, usage) and max_model_len() -----------------------------------------

class ReplayEngine:
    """A fake engine: answers every request with the same ids, and keeps the requests."""
    name, concurrent = "replay", False

    def __init__(self, ids):
        self.ids, self.requests = ids, []

    def max_model_len(self):
        return None

    def stream(self, request, usage=None):
        self.requests.append(request)
        yield from self.ids


class GreedyOnEmbeds:
    """A fake engine that decodes greedily, with the model itself, from the prompt embeddings that vLLM would
    be sent for the request."""
    name, concurrent = "greedy", True

    def __init__(self, vlm):
        self.vlm = vlm

    def max_model_len(self):
        return None

    def stream(self, request, usage=None):
        vlm, cache, sent = self.vlm, new_cache(self.vlm), completion(self.vlm, request)
        allowed = torch.zeros(vlm.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
        allowed[sent.allowed_ids] = True
        logits = forward(vlm, sent.embeds[None].to(vlm.device, vlm.dtype), cache)
        for _ in range(sent.max_tokens):
            token = int(logits.float().masked_fill(~allowed, float("-inf")).argmax())
            if token in sent.stop_ids:
                return
            yield token
            logits = forward(vlm, embed_token(vlm, token), cache)


def answer_text(message) -> str:
    """The text of a chat message as the handlers return it (a string, or text parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def test_a_replaying_engine_answers_a_whole_app_conversation(tiny_llava):
    from ui.handlers import Handlers
    ids = tiny_llava.tokenizer.encode("a fixed answer", add_special_tokens=False)
    engine = ReplayEngine(ids)
    h = Handlers(tiny_llava, max_new_tokens=8, session_options={"engine": engine})
    history, state = [], None
    for question, files in (("What is it?", [CAT]), ("And now?", [])):
        history, _, state, _ = h.add_message(history, {"text": question, "files": files}, state, *VISIONZIP)
        *_, last = h.respond(history, state, "kept")
        history, state, stats, *_ = last
        assert history[-1]["role"] == "assistant" and answer_text(history[-1]) == tiny_llava.tokenizer.decode(
            ids, skip_special_tokens=True)
        assert stat(stats, "engine").startswith("replay")
    first, second = engine.requests
    assert len(second.ids) > len(first.ids) > 64 and [len(f) for f in second.features] == [64]  # one image, 64 tokens
    assert second.ids[:len(first.ids)] == first.ids  # turn 2 extends turn 1's prompt


def test_the_engine_path_sends_a_run_time_method_s_tokens(throwaway, tiny_llava, photo):
    """A method registered here answers on the engine path exactly as on zipchat's decoder (float32)."""
    answers = []
    for engine in (None, GreedyOnEmbeds(tiny_llava)):
        s = ChatSession(tiny_llava, method="least", max_new_tokens=6, engine=engine)
        s.add_image(photo)
        answers.append((s.ask("What is it?"), s.ask("Tell me more."), s.last_turn.engine))
    assert answers[0][:2] == answers[1][:2] and answers[1][2] == "greedy" and answers[0][2] == "transformers"
