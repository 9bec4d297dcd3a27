"""The benchmark harness runs and reports what it measured (no timing is asserted here)."""

import json

from pipeline import bench


def test_bench_rows_5_and_6_write_table_and_json(tmp_path, capsys):
    bench.main(["--quick", "--rows", "5,6", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu-quick.json").read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == {"5", "6"}
    assert data["meta"]["command"].startswith("python -m pipeline.bench --quick")
    # row 5 reads the KV bytes off a real (meta-device) cache: 2 (K,V) x 32 layers x 4096 x fp16 per token
    per_token = 2 * 32 * 4096 * 2
    kv64, kv576 = rows["5"]["a_s"][0], rows["5"]["b_s"][0]
    assert kv64 % per_token == 0 and kv576 % per_token == 0 and kv576 // per_token - kv64 // per_token == 576 - 64
    assert abs(rows["5"]["ratio"] - kv64 / kv576) < 1e-12
    assert len(rows["6"]["a_s"]) == 10 and all(t > 0 for t in rows["6"]["a_s"])
    printed = capsys.readouterr().out
    assert "| 5 | KV-cache bytes" in printed and (tmp_path / "cpu-quick.md").read_text().strip() in printed
