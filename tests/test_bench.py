"""The benchmark harness runs every row's code and reports what it measured. Timings are never
asserted here (--smoke swaps the architecture presets for the tiny models: seconds, not numbers)."""

import json

import pytest
import torch

from pipeline import bench
from pipeline.arch import ARCH_PRESETS, build_arch_model

ALL_ROWS = ["1", "2", "3", "3b", "4", "5", "6", "7", "8", "9", "9b", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19",
            "20", "21a", "21b", "21c", "21d", "21e", "21f", "21g", "22a", "22b", "22c", "22d", "22e", "22f", "22g",
            "23a", "23b", "23c", "23d", "23e", "23f", "24", "24b", "24c", "28a", "28b", "28c", "29", "29b", "29c", "30", "30b"]


def test_every_bench_row_runs_and_is_reported(tmp_path, capsys):
    bench.main(["--smoke", "--rows", ",".join(ALL_ROWS), "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu-smoke.json").read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(ALL_ROWS)
    assert data["meta"]["smoke"] and data["meta"]["command"].startswith("python -m pipeline.bench --smoke")
    for r in rows.values():
        assert r["a_s"] and r["b_s"] and r["ratio"] > 0 and (r["target"] or r["notes"])  # no target: says why
    # row 5 reads the KV bytes off a real (meta-device) cache of the 7B shapes:
    # K and V x 32 layers x 4096 x 2 bytes (fp16) per token
    per_token = 2 * 32 * 4096 * 2
    kv64, kv576 = rows["5"]["a_s"][0], rows["5"]["b_s"][0]
    assert kv64 % per_token == 0 and kv576 % per_token == 0 and kv576 // per_token - kv64 // per_token == 576 - 64
    # row 8's token counts: base + 3x3 tiles at 64 per crop vs OneVision's full packing (base 27x27 = 729,
    # tiles 81x81 = 6561 (no padding, at the anyres_max_9 limit, so no pooling) + a newline per row = 6642),
    # with the same text on both sides
    n_zip, n_full = map(int, rows["8"]["what"].split("(")[-1].split(" tokens")[0].split(" vs "))
    assert n_full - n_zip == (729 + 6561 + 81) - 10 * 64
    printed = capsys.readouterr().out
    assert "| 5 | KV-cache bytes" in printed and (tmp_path / "cpu-smoke.md").read_text().strip() in printed


@pytest.mark.parametrize("name", sorted(ARCH_PRESETS))
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_architecture_preset_builds(name, quick):
    """Every preset the bench may load builds (on the meta device: no memory), at full and --quick shapes;
    --quick halves depth and width but keeps the heads' width and a family's layout rules."""
    family, vision, text = ARCH_PRESETS[name]
    model, tokenizer, _ = build_arch_model(name, "meta", torch.float32, quick)
    full, _, _ = build_arch_model(name, "meta", torch.float32) if quick else (model, None, None)
    layers = len(family(model.config, None, tokenizer).tower_layers(model))
    assert layers == len(family(full.config, None, tokenizer).tower_layers(full)) // (2 if quick else 1)
    text_config = model.config.text_config
    assert text_config.num_hidden_layers == text["num_hidden_layers"] // (2 if quick else 1)
    assert text_config.hidden_size // text_config.num_attention_heads == text["hidden_size"] // text["num_attention_heads"]
    full_blocks = getattr(model.config.vision_config, "fullatt_block_indexes", None)
    if full_blocks is not None:  # Qwen: the last block is a full-attention block (VisionZip reads it)
        assert full_blocks[-1] == layers - 1 and all(0 <= i < layers for i in full_blocks)
