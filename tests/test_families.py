"""What every family provides, and models placed by accelerate (device_map) across devices."""

import numpy as np
import pytest
import torch

from pipeline import ChatSession, load_vlm
from pipeline.families import FAMILIES
from pipeline.models import PRESETS, SGL_PAIRS
from tests.conftest import FAMILY_FIXTURES


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


def test_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from pipeline.models import cpu_native_bf16, default_device_dtype
    assert cpu_native_bf16("flags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni")
    assert cpu_native_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_native_bf16("flags : fpu sse avx2 fma f16c")
    monkeypatch.delenv("ZIPCHAT_DTYPE", raising=False)
    monkeypatch.setattr("pipeline.models.cpu_native_bf16", lambda flags=None: True)
    assert default_device_dtype("cpu")[1] == torch.bfloat16
    monkeypatch.setattr("pipeline.models.cpu_native_bf16", lambda flags=None: False)
    assert default_device_dtype("cpu")[1] == torch.float32
    monkeypatch.setenv("ZIPCHAT_DTYPE", "bfloat16")  # --dtype / ZIPCHAT_DTYPE override the choice
    assert default_device_dtype("cpu")[1] == torch.bfloat16
    assert default_device_dtype("cpu", "float32")[1] == torch.float32
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):  # a Space variable with a typo says so
        default_device_dtype("cpu", "fp8")


@pytest.mark.parametrize("name", ["tiny-ov-small", "tiny-next", "tiny-internvl-small"])
def test_tile_cap_limits_what_visionzip_encodes(name):
    """A 1152x768 (3:2) photo: the checkpoint's own tiling, and a cap of 2 tiles, which leaves one row of
    two (the base image or thumbnail besides); Full always keeps the checkpoint's tiling, and the counts
    say what full would send."""
    capped = (1, 2)
    from PIL import Image
    from pipeline import encode_image
    from tests.conftest import ROOT
    vlm = load_vlm(name)
    image = Image.open(ROOT / "assets" / "astronaut.png").convert("RGB").resize((1152, 768))
    free, cap = vlm.family.prepare(image), vlm.family.prepare(image, max_tiles=2)
    assert cap.tile_grid == capped and len(cap.crops) == 1 + capped[0] * capped[1] < len(free.crops)
    zipped = encode_image(vlm, image, "visionzip", max_tiles=2)
    full = encode_image(vlm, image, "full", max_tiles=2)
    assert len(zipped.crops) == len(cap.crops) and zipped.num_tokens == 64 * len(cap.crops)
    assert len(full.crops) == len(free.crops) and zipped.full_tokens == full.full_tokens == full.num_tokens
    s = ChatSession(vlm, method="visionzip", max_tiles=2, max_new_tokens=2)
    s.add_image(image)
    assert s.ask("What is it?") and s.last_turn.visual_tokens == zipped.num_tokens
    s.set_method("visionzip", max_tiles=0)  # lifting the cap re-encodes once, at the next turn
    s.ask("And now?")
    assert s.last_turn.images_encoded == 1 and s.last_turn.visual_tokens == 64 * len(free.crops)


BF16_PAIRS = {"tiny-llava": None, "tiny-next": None, "tiny-ov-small": "tiny-ov-large",
              "tiny-internvl-small": "tiny-internvl-large", "tiny-qwen-small": "tiny-qwen-large"}


@pytest.mark.parametrize("name", list(BF16_PAIRS))
def test_bf16_runs_every_method_and_selects_like_float32(name, photo):
    """bf16 is the default on a CPU with native bf16 (and on GPUs): every method, map and compare must
    work there, and VisionZip must pick (almost) the same dominant patches as in float32."""
    from pipeline.heatmap import VIEWS, render_map
    from pipeline import compare
    vlm, reference = load_vlm(name, dtype=torch.bfloat16), load_vlm(name, dtype=torch.float32)
    assert vlm.model.dtype == torch.bfloat16
    picked = []
    for model in (vlm, reference):
        s = ChatSession(model, method="visionzip", max_new_tokens=4)
        s.add_image(photo)
        picked.append([set(c.dominant.tolist()) for c in s.current_view()[1].crops])
    overlap = sum(len(a & b) for a, b in zip(*picked)) / sum(len(a) for a in picked[1])
    assert overlap >= 0.85, f"bf16 keeps {overlap:.0%} of float32's dominant patches"
    for method in ("full", "visionzip", "manual"):
        s = ChatSession(vlm, method=method, max_new_tokens=4)
        s.add_image(photo, compress=False)
        if method == "manual":
            assert s.picks_from_visionzip() > 0
        assert s.ask("What is it?") and s.ask("And now?") and s.last_turn.new_tokens > 0
        image, comp = s.current_view()
        for view in VIEWS[:3]:
            assert render_map(image, comp, view).getbbox() is not None
        assert len(compare(s, max_new_tokens=3)) == (3 if method == "manual" else 2)
    if BF16_PAIRS[name]:
        large = load_vlm(BF16_PAIRS[name], dtype=torch.bfloat16)
        s = ChatSession(large, method="sgl", small=vlm, early_exit=None, keep_ratio=0.3, max_new_tokens=4)
        s.add_image(photo)
        assert s.ask("What is it?") and s.ask("And now?")
        image, comp, importance, kept = s.guidance_view()
        assert np.isfinite(importance).all() and 0 < kept.sum() < len(kept)
        assert render_map(image, comp, "importance", importance=importance, kept=kept).getbbox() is not None


def test_tile_cap_limits_the_area_qwen_encodes():
    """Qwen2.5-VL has no tiles: a cap of 2 limits a 1152x768 photo to the area of 1 + 2 tiles of 448 px
    (at most 3 x 256 units of 28 px), close to that area and with the photo's shape; Full keeps the
    checkpoint's resolution."""
    from PIL import Image
    from pipeline import encode_image
    from tests.conftest import ROOT
    vlm = load_vlm("tiny-qwen-small")
    image = Image.open(ROOT / "assets" / "astronaut.png").convert("RGB").resize((1152, 768))
    free, cap = vlm.family.prepare(image), vlm.family.prepare(image, max_tiles=2)
    (rows, cols), (free_rows, free_cols) = cap.crops[0].grid, free.crops[0].grid
    assert free_rows * free_cols == round(768 / 28) * round(1152 / 28)  # under the checkpoint's limit: as is
    assert 0.8 * 3 * 256 <= rows * cols <= 3 * 256 and abs(cols / rows - 1.5) < 0.1
    zipped, full = (encode_image(vlm, image, m, max_tiles=2) for m in ("visionzip", "full"))
    assert zipped.full_tokens == full.num_tokens == free_rows * free_cols  # the counts say what full sends
    assert zipped.num_tokens == round(rows * cols * 64 / 576)
    s = ChatSession(vlm, method="visionzip", max_tiles=2, max_new_tokens=2)
    s.add_image(image)
    assert s.ask("What is it?") and s.last_turn.visual_tokens == zipped.num_tokens


@pytest.mark.parametrize("name", list(FAMILY_FIXTURES))
def test_layout_is_what_the_processor_gives(name, request):
    """`layout` (arithmetic, no pixels: what counting an image's uncompressed tokens uses) agrees with the
    processor's own output for photos of many shapes, with and without a tile cap: as many crops as
    the processor makes pixel tiles (Qwen: as many units as its patch grid), in the same image size."""
    from PIL import Image
    vlm = request.getfixturevalue(FAMILY_FIXTURES[name])
    for w, h in [(451, 300), (300, 451), (1152, 768), (2000, 500), (64, 900), (1300, 1300)]:
        image = Image.new("RGB", (w, h), "gray")
        for cap in (None, 2, 4):
            layout, prepared = vlm.family.layout(image, cap), vlm.family.prepare(image, cap)
            assert layout.pixel_values is None and layout.image_size == (h, w)
            assert (layout.crops, layout.tile_grid) == (prepared.crops, prepared.tile_grid)
            if "grid_thw" in prepared.extra:
                _, rows, cols = prepared.extra["grid_thw"][0].tolist()
                merge = vlm.family.merge
                assert layout.crops[0].grid == (rows // merge, cols // merge)
            else:
                assert prepared.pixel_values.shape[0] == len(layout.crops)
            if vlm.family.tiles and hasattr(vlm.family.image_processor, "image_grid_pinpoints"):
                sizes = vlm.family.image_processor(images=[image], return_tensors="pt")["image_sizes"][0].tolist()
                assert tuple(sizes) == (h, w)
