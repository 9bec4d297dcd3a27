"""What every family provides, and models placed by accelerate (device_map) across devices."""

import pytest

from pipeline import ChatSession, load_vlm
from pipeline.families import FAMILIES
from pipeline.models import PRESETS, SGL_PAIRS


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_checkpoints_tiny_and_architecture_presets(family):
    assert family.presets and family.tiny and family.arch and family.chat_template and family.stop_strings
    assert set(family.presets) | set(family.tiny) | set(family.arch) <= set(PRESETS)
    for large, small in family.sgl_pairs.items():  # pairs stay inside one family (one visual layout)
        assert {large, small} <= set(family.presets) | set(family.tiny) and SGL_PAIRS[large] == small


def offloaded_map(vlm, disk_layer: int) -> dict:
    """A per-module placement: everything on the CPU but one decoder layer offloaded to disk, so that
    accelerate's hooks load its weights at every call (the code path of a model split across GPUs)."""
    names = [n for n, _ in vlm.model.named_children()]
    placement = {f"model.{n}": "cpu" for n, _ in vlm.model.model.named_children() if n != "language_model"}
    placement.update({f"model.{n}": "cpu" for n, _ in vlm.model.model.named_parameters(recurse=False)})
    placement.update({f"model.language_model.{n}": "cpu" for n, _ in vlm.language_model.named_children()})
    del placement["model.language_model.layers"]
    for i in range(len(vlm.language_model.layers)):
        placement[f"model.language_model.layers.{i}"] = "disk" if i == disk_layer else "cpu"
    placement.update({n: "cpu" for n in names if n != "model"})
    return placement


@pytest.mark.filterwarnings("ignore:The following device_map keys")  # a parameter, not a submodule: accelerate notes it
@pytest.mark.parametrize("method", ["visionzip", "sgl"])
def test_device_map_gives_the_same_answers(method, tiny_ov, tiny_ov_large, photo, tmp_path):
    placed = load_vlm("tiny-ov-large", device_map=offloaded_map(tiny_ov_large, disk_layer=2))
    assert placed.model.hf_device_map["model.language_model.layers.2"] == "disk"
    layer = placed.language_model.layers[2]
    assert type(layer._hf_hook).__name__ == "AlignDevicesHook"  # accelerate moves its weights in per call
    answers = []
    for vlm in (placed, tiny_ov_large):
        s = ChatSession(vlm, method=method, small=tiny_ov, early_exit=None, keep_ratio=0.3, max_new_tokens=6)
        s.add_image(photo)
        answers.append([s.ask("What is it?"), s.ask("And now?")])
    assert answers[0] == answers[1] and all(answers[0])
