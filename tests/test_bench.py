"""The benchmark's bookkeeping: results merge per device, the generated table keeps the hand-written text,
end-to-end times come from the stages' own records, and the small measurements run on the real code."""

from __future__ import annotations

import json

import torch

from pipeline.config import BenchConfig
from stages import bench


def _result(device: str, value: str) -> dict:
    return {"device": device, "machine": f"{device}-box", "date": "2026-11-27", "commit": "abc1234",
            "figures": [{"figure": "matmul fp32", "value": value},
                        {"figure": "train speed-up", "value": "9.0x", "target": ">= 8x", "met": True}]}


def test_outputs_merge_devices_and_keep_the_analysis(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro stays\n\n{bench.BEGIN}\nold table\n{bench.END}\n\n## Analysis\nkept\n")
    cfg = BenchConfig(json=tmp_path / "b.json", markdown=md)
    bench.write_outputs(cfg, _result("cpu", "100.0 GFLOP/s"))
    bench.write_outputs(cfg, _result("cuda", "700000.0 GFLOP/s"))
    bench.write_outputs(cfg, _result("cpu", "120.0 GFLOP/s"))  # a rerun replaces that device's figures

    data = json.loads(cfg.json.read_text())
    assert set(data) == {"cpu", "cuda"}
    assert data["cpu"]["figures"][0]["value"] == "120.0 GFLOP/s"
    text = md.read_text()
    assert "intro stays" in text and "## Analysis\nkept" in text and "old table" not in text
    assert "| matmul fp32 | 120.0 GFLOP/s |" in text and "| matmul fp32 | 700000.0 GFLOP/s |" in text
    assert "100.0 GFLOP/s" not in text
    assert text.count("| train speed-up | 9.0x | >= 8x | yes |") == 2


def test_end_to_end_reads_the_stage_records(tiny_shards, tiny_store, tiny_run):
    e2e = bench.end_to_end(shards=tiny_shards, store=tiny_store, run=tiny_run)
    fetch_rec = json.loads((tiny_shards / "_fetch" / "run.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert e2e["fetch_s"] == fetch_rec["timings"]["total_s"] > 0
    assert e2e["encode_s"] > 0
    assert e2e["train_s"] == summary["stage_wall_s"] > 0
    assert "eval_s" not in e2e and "total_s" not in e2e  # no eval yet: no made-up total


def test_matmul_rate_is_positive_and_stops_growing_on_budget():
    r = bench.matmul_rate(torch.device("cpu"), torch.float32, budget_s=0.01, sync=lambda: None)
    assert r["gflops"] > 0 and r["n"] <= 1024
