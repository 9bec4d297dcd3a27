"""The structure: no import circle; a method is one record, registered by one file, and everything else reads
the record (a throw-away method written here, in this file only, shows up wherever the built-in ones do);
an engine is anything with `stream(request, usage)` and `max_model_len()`."""

from dataclasses import replace

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
    assert edges["pipeline.methods.registry"] <= {"pipeline.errors", "pipeline.config"}
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
    assert stat(stats, "model") == f"{tiny_llava.name} (Least attended)" and history[-1]["role"] == "assistant"
    *_, (table, answers, maps, overlap_table, _files) = h.compare_answers(state, ["least", "full"])
    assert list(compare_rows(table)) == ["Least attended", "Full"] and "**Least attended:**" in answers
    assert len(maps) == 2 and maps[0][1].startswith("Least attended: 64 of")


# ---- a throw-away in-LLM method with one knob: FastV's pruning at a layer of its own ------------------------

@pytest.fixture
def deep_fastv():
    """FastV, pruning at its own knob's layer (the knob's value reaches the turn through the settings)."""
    from pipeline.methods.fastv import KNOBS, fastv_answer

    def answer(ctx):
        depth = ctx.settings.knobs["deep_layer"]
        ctx.settings = replace(ctx.settings, fastv_layer=depth)
        ctx.stats.timings["deep_layer"] = depth
        return (yield from fastv_answer(ctx))
    knob = registry.Knob("deep_layer", "deep layer", 1, 8, 3, integer=True, help="prune after this layer")
    record = registry.register(registry.Method(
        "deep", "Deep FastV", registry.IN_LLM, answer=answer, images="full", engines=("transformers",), knobs=(knob,),
        stats_rows=lambda t: [("Deep: pruned at", str(t.timings.get("deep_layer")))], doc="FastV at a layer of its own"))
    yield record
    registry.unregister("deep")
    assert KNOBS[0].name == "fastv_layer"  # (FastV's own knob is unchanged)


def test_an_in_llm_method_with_a_knob_answers_as_fastv_at_that_layer(deep_fastv, tiny_ov_large, photo):
    from ui.text import format_stats
    s, reference = ChatSession(tiny_ov_large, method="deep", max_new_tokens=5), ChatSession(
        tiny_ov_large, method="fastv", fastv_layer=3, max_new_tokens=5)  # (4 layers: K = 3 and K = 1 differ)
    assert s.settings.knobs["deep_layer"] == 3  # the knob's default
    for session in (s, reference):
        session.add_image(photo)
    assert s.ask("What is it?") == reference.ask("What is it?")
    assert s.last_turn.guidance.prune_layer == 3 and "| Deep: pruned at | 3 |" in format_stats(s.last_turn)
    kept_at_3 = s.last_turn.guidance.kept.tolist()
    s.set_method("deep", deep_layer=1)
    reference.set_method("fastv", fastv_layer=1)
    assert s.ask("And now?") == reference.ask("And now?") and s.last_turn.guidance.prune_layer == 1
    other = ChatSession(tiny_ov_large, method="fastv", fastv_layer=1, max_new_tokens=5)
    other.add_image(photo)
    other.ask("What is it?")
    assert other.last_turn.guidance.kept.tolist() != kept_at_3  # (the layer matters: the knob is not a no-op)
    for bad, message in ((9, "between 1 and 8"), (2.5, "whole number"), ("x", "must be a number")):
        with pytest.raises(InputError, match=message):
            s.set_method("deep", deep_layer=bad)
    with pytest.raises(InputError, match="Unknown setting"):
        s.set_method("deep", shallow_layer=1)
    assert s.settings.knobs["deep_layer"] == 1  # nothing changed on a bad value


def knob_values(**chosen) -> list:
    """The page's knob sliders' values, in their API order: each knob's default, or the value chosen."""
    from ui.text import drawn_knobs
    return [chosen.get(k.name, k.default) for k in drawn_knobs()]


def test_an_in_llm_method_with_a_knob_gets_a_slider_on_the_page(deep_fastv, tiny_llava):
    import app
    from ui.handlers import Handlers
    demo = app.build_demo(tiny_llava, banner="offline", max_new_tokens=3)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert ("Deep FastV", "Deep FastV") in blocks["method"].choices
    slider = blocks["knob_deep_layer"]
    assert (slider.minimum, slider.maximum, slider.value, slider.step) == (1, 8, 3, 1)
    h = Handlers(tiny_llava, max_new_tokens=3)
    history, _, state, _ = h.add_message([], {"text": "What is it?", "files": [CAT]}, None,
                                         "Deep FastV", *VISIONZIP[1:], 0, 3, 0.0, 0.9, 2, 0.5, *knob_values(deep_layer=2))
    *_, last = h.respond(history, state, "kept")
    history, state, stats, *_ = last
    assert state.chat.settings.knobs["deep_layer"] == 2 and stat(stats, "Deep: pruned at") == "2"
    *_, (table, answers, maps, overlap_table, _files) = h.compare_answers(state, ["deep", "visionzip", "full"])
    assert list(compare_rows(table)) == ["Deep FastV", "VisionZip", "Full"]
    assert compare_rows(table)["Deep FastV"][0] == "288 from layer 1 (576 below)"  # tiny-llava: K clamped to 1
    assert maps[0][1] == "Deep FastV: 288 of 576 tokens" and "| Deep FastV |" in overlap_table
    history, *_ = h.add_message(history, {"text": "Again?", "files": []}, state,
                                "Deep FastV", *VISIONZIP[1:], 0, 3, 0.0, 0.9, 2, 0.5, *knob_values(deep_layer=99))
    assert "between 1 and 8" in history[-1]["content"]  # refused with a message; the session goes on


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
        yield from self.ids[:request.max_tokens]


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


def floors_from_the_docs() -> dict:
    """docs/architecture.md's floor table -> {module or package prefix: floor}."""
    import re
    from tests.conftest import ROOT
    floors = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].isdigit():
            for name in re.findall(r"`([^`]+)`", cells[2]):
                name = name.replace("/*.py", "/").removesuffix(".py")
                prefix = name if name in ("app",) or name.startswith(("ui/",)) else f"pipeline/{name}"
                floors[prefix.replace("/", ".").rstrip(".")] = int(cells[1])
    return floors


def floor_of(module: str, floors: dict) -> int:
    best = max((p for p in floors if module == p or module.startswith(p + ".")), key=len, default=None)
    return floors[best] if best is not None else None


def test_every_import_goes_down_the_floors_the_docs_give():
    floors, edges = floors_from_the_docs(), graph()
    assert floors["pipeline.config"] == 0 and floors["pipeline.session"] == 5 and floors["ui"] == 7
    unplaced = [m for m in edges if m not in ("pipeline", "pipeline.__main__") and floor_of(m, floors) is None]
    assert unplaced == []  # every module has its floor on the page
    upward = [(m, t) for m, targets in edges.items() for t in targets
              if floor_of(m, floors) is not None and floor_of(t, floors) is not None
              and floor_of(t, floors) > floor_of(m, floors)]
    assert upward == []


def test_no_module_or_function_past_the_size_rules():
    from tests.code_shape import long_functions, long_modules
    assert long_modules() == [] and long_functions() == []
