"""Compare across any set of methods: the same answers as sessions of each method given the same history,
and the overlap of kept sets against a computation from scratch."""

import numpy as np
import pytest

from pipeline import ChatSession, InputError, compare, encode_image
from pipeline.compare import kept_view, overlap

Q1, Q2, Q3 = "What is in the image?", "What colour is it?", "Where is it?"
METHODS = ["divprune", "vispruner", "random", "pool", "fastv", "visionzip", "full"]


def test_compare_any_set(tiny_ov, photo):
    s = ChatSession(tiny_ov, method="visionzip", max_new_tokens=5)
    s.add_image(photo)
    s.ask(Q1)
    s.ask(Q2)
    results = compare(s, METHODS)
    assert [m for m, _, _ in results] == METHODS
    key = s.state.last_image_key
    for method, answer, stats in results:  # each: a session of that method, the same first turn, from scratch
        reference = ChatSession(tiny_ov, method=method, max_new_tokens=5, reuse_cache=False)
        reference.state.images = dict(s.state.images)
        reference.state.turns = list(s.state.turns[:1])
        assert reference.ask(Q2) == answer, method
        assert stats.method == method and not stats.cache_reused
    # kept sets from scratch: the compress-once selections, FastV's kept tokens through Full's token map
    image = s.image(key)
    kept = {}
    for method in ("divprune", "vispruner", "random", "visionzip"):
        comp = encode_image(tiny_ov, image, method)
        kept[method] = {(i, int(u)) for i, c in enumerate(comp.crops) for u in list(c.dominant) + list(c.targets)}
    full = encode_image(tiny_ov, image, "full")
    g = dict((m, t) for m, _, t in results)["fastv"].guidance
    kept["fastv"] = {(int(full.token_map[t][0]), int(full.token_map[t][1])) for t in g.kept if full.token_map[t][1] >= 0}
    names, matrix = overlap(s, results)
    assert names == ["divprune", "vispruner", "random", "fastv", "visionzip"]  # Pool and Full keep no set
    for a, row in zip(names, matrix):
        for b, value in zip(names, row):
            expected = len(kept[a] & kept[b]) / len(kept[a] | kept[b])
            assert value == pytest.approx(expected), (a, b)
    # the maps: each method's kept view sends what it kept
    _, fastv_view = kept_view(s, "fastv", dict((m, t) for m, _, t in results)["fastv"])
    assert sum(len(c.kept) for c in fastv_view.crops) == len(kept["fastv"])
    _, pool_view = kept_view(s, "pool")
    assert all(len(c.kept) == 0 and (c.groups >= 0).all() for c in pool_view.crops)
    # the conversation itself is untouched: its next turn reuses its cache, with its own method
    s.ask(Q3)
    assert s.last_turn.cache_reused and s.last_turn.method == "visionzip" and len(s.state.turns) == 3


def test_default_set_and_bad_choices(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="divprune", max_new_tokens=3)
    s.add_image(photo)
    with pytest.raises(InputError, match="Ask a question first"):
        compare(s)
    s.ask(Q1)
    assert [m for m, _, _ in compare(s)] == ["divprune", "visionzip", "full"]
    for bad, message in ((["divprune", "nope"], "Unknown method"), ("visionzip", "list of method"),
                         ([], "at least one"), (["sgl"], "small model"), (["manual"], "pick some")):
        with pytest.raises(InputError, match=message):
            compare(s, bad)
    assert len(s.state.turns) == 1 and np.isfinite(s.last_turn.ttft_s)
