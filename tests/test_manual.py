"""The manual method: the LLM receives exactly the units a person picked, each as itself."""

import pytest
import torch

from pipeline import ChatSession, InputError, compare


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-ov-small", "tiny-qwen-small"])
def test_the_answer_uses_exactly_the_picked_units(name, photo, request):
    vlm = request.getfixturevalue({"tiny-llava": "tiny_llava", "tiny-ov-small": "tiny_ov",
                                   "tiny-qwen-small": "tiny_qwen"}[name])
    s = ChatSession(vlm, method="manual", max_new_tokens=4)
    s.add_image(photo, compress=False)
    with pytest.raises(InputError, match="Pick at least one patch"):
        s.ask("What is it?")
    assert s.state.turns == [] and len(s.state.pending) == 1  # nothing lost: the image waits for picks
    picks = {0: [5, 17, 40, 41, 42]}
    if len(s.current_view()[1].crops) > 1:
        picks[1] = [0, 3]
    s.set_picks(picks)
    assert s.ask("What is it?") and s.last_turn.visual_tokens == sum(len(u) for u in picks.values())
    comp = s.compression(s.state.last_image_key)
    assert comp.token_map[:, :2].tolist() == [[c, u] for c in sorted(picks) for u in picks[c]]
    # each token is its unit's own feature, projected (the tower's output, no merging)
    prepared = vlm.family.prepare(photo, s.settings.max_tiles)
    units = vlm.family.encode(vlm.model, prepared, with_stats=False).units
    offset = 1 if vlm.family.has_cls else 0
    with torch.no_grad():
        expected = torch.cat([vlm.family.project(vlm.model, units[c][torch.tensor(u) + offset][None])[0]
                              for c, u in sorted(picks.items())])
    torch.testing.assert_close(comp.features, expected, rtol=1e-4, atol=1e-4)


def test_picks_brush_start_from_visionzip_and_compare(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="manual", max_new_tokens=4)
    s.add_image(photo, compress=False)
    assert s.toggle_pick(0, 24 * 10 + 10, radius=1) == 9  # a 3x3 block around row 10, column 10
    assert s.toggle_pick(0, 24 * 10 + 10) == 8  # clicking a picked unit unpicks it
    assert s.toggle_pick(0, 0, radius=2) == 17  # a corner: the block is cut at the edges (3x3)
    with pytest.raises(InputError, match="unit"):
        s.set_picks({0: [576]})
    n = s.picks_from_visionzip()
    zip_view = s.compression(s.state.last_image_key, method="visionzip").crops[0]
    assert n == len(zip_view.dominant) + len(zip_view.targets) == 53 + 10  # CLS is not a patch to pick
    s.ask("What is it?")
    assert s.last_turn.visual_tokens == 63
    results = compare(s)
    assert [m for m, _, _ in results] == ["manual", "visionzip", "full"]
    assert [t.visual_tokens for _, _, t in results] == [63, 64, 576]


def test_sampling_controls(tiny_llava, photo):
    """Greedy by default; temperature and top-p sample, reproducibly for the same conversation."""
    answers = {}
    for temperature in (0.0, 1.5, 1.5):
        s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=12, stop_at_eos=False)
        s.set_method("visionzip", temperature=temperature, top_p=0.95)
        s.add_image(photo)
        answers.setdefault(temperature, []).append(s.ask("What is it?"))
    assert answers[1.5][0] == answers[1.5][1] != answers[0.0][0]


def test_a_second_image_keeps_manual_working(tiny_ov_large, photo, photo2):
    """Picks on any image of the conversation; an image without picks goes as VisionZip's choice."""
    s = ChatSession(tiny_ov_large, method="manual", max_new_tokens=3)
    first = s.add_image(photo, compress=False) or s.state.last_image_key
    n = s.picks_from_visionzip()
    s.ask("What is it?")
    assert s.last_turn.visual_tokens == n
    second = s.add_image(photo2, compress=False) or s.state.last_image_key
    s.ask("And this one?")  # the new image has no picks: it is sent as VisionZip's choice, the first as picked
    zip_second = s.compression(second, method="visionzip")
    assert s.last_turn.visual_tokens == n + zip_second.num_tokens
    assert "as VisionZip's choice" in s.current_view(key=second)[1].caption()
    before = {c: set(u) for c, u in s.state.picks[first].items()}
    cols = s.compression(first, method="visionzip").crops[0].grid[1]
    picked = s.toggle_pick(0, 3, radius=1, key=first)  # picks on the earlier image change only its tokens
    block = {r * cols + c for r in (0, 1) for c in (2, 3, 4)}  # (row 0: the block is cut at the edge)
    crop0 = before[0] - block if 3 in before[0] else before[0] | block
    assert {c: set(u) for c, u in s.state.picks[first].items()} == {**before, 0: crop0} and second not in s.state.picks
    assert picked == n - len(before[0]) + len(crop0) != n
    s.set_picks({0: [1, 2, 3]}, key=second)
    s.ask("Both again?")
    assert s.last_turn.visual_tokens == picked + 3
    results = compare(s, ["manual", "visionzip"])
    assert [t.visual_tokens for _, _, t in results] == [picked + 3, s.compression(first, method="visionzip").num_tokens
                                                        + zip_second.num_tokens]


def test_manual_without_any_picks_says_so(tiny_llava, photo, photo2):
    s = ChatSession(tiny_llava, method="manual", max_new_tokens=3)
    s.add_image(photo, compress=False)
    s.add_image(photo2, compress=False)
    with pytest.raises(InputError, match="Pick at least one patch on the map"):
        s.ask("What are they?")
    with pytest.raises(InputError, match="That image is not in this conversation"):
        s.toggle_pick(0, 0, key="not-a-key")
