"""The benchmark's bookkeeping: results merge per machine kind, the generated table keeps the hand-written text,
quick runs leave docs/ alone, ratios are taken round by round, end-to-end times come from the stages' own
records, and the small measurements run on the real code in both precisions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, SESSION_START

from pipeline import benchmark
from pipeline.config import BenchConfig
from stages import bench


def _result(kind: str, value: str) -> dict:
    return {"kind": kind, "device": kind.split("-")[0], "machine": f"{kind}-box", "date": "2026-11-27", "commit": "abc1234",
            "figures": [{"figure": "matmul fp32", "value": value},
                        {"figure": "train speed-up", "value": "9.0x", "target": ">= 8x", "met": True}]}


def test_outputs_merge_devices_and_keep_the_analysis(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro stays\n\n{benchmark.BEGIN}\nold table\n{benchmark.END}\n\n## Analysis\nkept\n")
    cfg = BenchConfig(json=tmp_path / "b.json", markdown=md)
    benchmark.write_outputs(cfg, _result("cpu-avx2", "100.0 GFLOP/s"))
    benchmark.write_outputs(cfg, _result("cuda-nvidia-h100", "700000.0 GFLOP/s"))
    benchmark.write_outputs(cfg, _result("cpu-avx512bf16", "400.0 GFLOP/s"))
    benchmark.write_outputs(cfg, _result("cpu-avx2", "120.0 GFLOP/s"))  # a rerun replaces its own kind's rows only

    data = json.loads(cfg.json.read_text())
    assert set(data) == {"cpu-avx2", "cpu-avx512bf16", "cuda-nvidia-h100"}
    assert data["cpu-avx2"]["figures"][0]["value"] == "120.0 GFLOP/s"
    assert data["cpu-avx512bf16"]["figures"][0]["value"] == "400.0 GFLOP/s"
    text = md.read_text()
    assert "intro stays" in text and "## Analysis\nkept" in text and "old table" not in text
    assert "| matmul fp32 | 120.0 GFLOP/s |" in text and "| matmul fp32 | 700000.0 GFLOP/s |" in text
    assert "100.0 GFLOP/s" not in text
    assert text.count("| train speed-up | 9.0x | >= 8x | yes |") == 3
    assert "| cpu-avx512bf16 | cpu-avx512bf16-box |" in text
    before = text
    benchmark.write_outputs(cfg, _result("cpu-avx2", "1.0 GFLOP/s"), markdown=False)  # JSON only
    assert md.read_text() == before and "1.0 GFLOP/s" in cfg.json.read_text()


def test_quick_or_json_elsewhere_leaves_the_committed_docs_alone(tmp_path):
    docs = BenchConfig()  # the committed pair: docs/benchmarks.json beside docs/BENCHMARKS.md
    assert benchmark.outputs_plan(docs) == (True, True)
    assert benchmark.outputs_plan(BenchConfig(quick=True)) == (False, False)
    assert benchmark.outputs_plan(BenchConfig(json=tmp_path / "b.json")) == (True, False)
    assert benchmark.outputs_plan(BenchConfig(quick=True, json=tmp_path / "b.json")) == (True, False)
    side = BenchConfig(json=tmp_path / "b.json", markdown=tmp_path / "B.md")  # a pair of one's own
    assert benchmark.outputs_plan(side) == (True, True)


def test_interleaved_rounds_and_ratio_spread():
    calls = []
    t = benchmark.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(v) for v in t.values()] == [3, 3]  # warm-up rounds are not kept
    r = benchmark.ratios([10.0, 12.0, 8.0], [5.0, 4.0, 4.0])  # round by round: 2, 3, 2
    assert r == {"median": 2.0, "min": 2.0, "max": 3.0, "n": 3}
    assert benchmark.met_at_least(r, 2.0) and not benchmark.met_at_least(r, 2.5)  # must hold across the spread
    assert benchmark.fmt(r, 1) == "2.0 (2.0-3.0)" and benchmark.fmt(benchmark.spread([0.5]), pct=True) == "50%"


def test_end_to_end_adds_up_the_stage_records(tmp_path):
    shards, store, run = tmp_path / "shards", tmp_path / "f.zarr", tmp_path / "run"
    records = {shards / "_fetch" / "run.json": {"timings": {"total_s": 1.5}},
               store / "zarr.json": {"attributes": {"last_run": {"wall_s": 2.25}}},
               run / "summary.json": {"stage_wall_s": 3.0}}
    for path, rec in records.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    e2e = bench.end_to_end(shards=shards, store=store, run=run)
    assert e2e == {"fetch_s": 1.5, "encode_s": 2.25, "train_s": 3.0}  # no eval yet: no made-up total
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"wall_s": 4.0}))
    e2e = bench.end_to_end(shards=shards, store=store, run=run)
    assert e2e["eval_s"] == 4.0 and e2e["total_s"] == 10.75


def test_end_to_end_reads_what_the_stages_record(tiny_shards, tiny_store, tiny_run):
    """The real stages write the wall times bench reads: each ran inside this test session."""
    e2e = bench.end_to_end(shards=tiny_shards, store=tiny_store, run=tiny_run)
    session_s = time.time() - SESSION_START
    for key in ("fetch_s", "encode_s", "train_s"):
        assert isinstance(e2e[key], float) and 0 < e2e[key] < session_s, (key, e2e[key], session_s)
    assert "eval_s" not in e2e and "total_s" not in e2e


def test_matmul_rate_counts_2n3_flops_and_stops_growing_on_budget():
    cpu, sync = torch.device("cpu"), (lambda: None)
    assert bench.matmul_size(cpu, torch.float32, budget_s=0.0, sync=sync) == 256  # the smallest size
    r = bench.matmul_rate(cpu, torch.float32, budget_s=0.01, sync=sync)
    assert r["n"] in (256, 512, 1024)  # 8 products of n fit in the budget, 8 of 2n no longer do
    fn, flop = bench.matmul_fn(cpu, torch.float32, r["n"])
    assert flop == 2 * r["n"] ** 3
    # the rate is FLOPs over seconds in GFLOP/s: within 10x of one timed here (shared cores are noisy)
    t = benchmark.timed(fn, repeats=5, sync=sync)
    assert 0.1 < r["gflops"] / (flop / t / 1e9) < 10


def _tiny_decoder(width: int):
    from pipeline.model import DecoderConfig

    return DecoderConfig(layers=1, width=32, heads=2, mlp_dim=64, max_len=16, encoder_width=width,
                         tie_embeddings=False, image_pos_emb=False)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_generate_and_train_measurements_run_in_each_precision(precision):
    """The real measuring code on a tiny decoder (and the tiny ViT as the baseline's encoder)."""
    cpu, sync = torch.device("cpu"), (lambda: None)
    gen = bench.bench_generate(cpu, precision, True, sync, 1, image_tokens=197, dec_cfg=_tiny_decoder(192))
    assert gen["new_tokens"] == 16 and gen["kv_speedup"]["n"] == 1
    rate = {k: gen[f"{k}_img_per_s"]["median"] for k in ("cache", "no_cache", "beam3", "parallel")}
    assert gen["cache_tokens_per_s"]["median"] == pytest.approx(16 * rate["cache"])
    assert gen["kv_speedup"]["median"] == pytest.approx(rate["cache"] / rate["no_cache"])
    limit = {p: {"n": 128} for p in ("fp32", "bf16")}
    tr = bench.bench_train(cpu, precision, True, sync, limit, 1, dec_cfg=_tiny_decoder(192),
                           vit="vit_tiny_patch16_224", batch_size=4)
    assert tr["image_tokens"] == 197 and tr["batch_size"] == 4 and tr["decoder"]["width"] == 32
    ours, seed_style = (tr[f"samples_per_s_{k}"]["median"] for k in ("per-example", "baseline"))
    assert tr["speedup_vs_baseline"]["median"] == pytest.approx(ours / seed_style)
    # `auto` takes the cheaper cross-attention form, so it never costs more than the kv form
    assert 0 < tr["train_gflop_per_sample"] <= tr["train_gflop_per_sample_kv_form"]


def test_train_bench_reads_its_sizes_from_the_configs():
    from pipeline.config import TrainConfig

    cfg = bench.train_decoder_config(768)
    assert (cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.max_len) == (
        TrainConfig.layers, TrainConfig.width, TrainConfig.heads, TrainConfig.mlp_dim, TrainConfig.max_len)


def test_gpu_check_script_parses_and_its_plan_stays_out_of_the_users_folders():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=60, check=True).stdout
    plan = [x for x in out.splitlines() if x.startswith("[plan]")]
    assert [x.split()[1] for x in plan[:4]] == ["test-suite", "cuda-tests", "make-all", "bench"]
    make_all = plan[2]
    work = make_all.split("(cd ")[1].split(" &&")[0]
    assert "cappa-gpu-check" in work and not Path(work).exists()  # a temporary folder, removed afterwards
    assert "--count 500" in make_all and "--epochs 1" in make_all and make_all.count("--device cuda") == 3
    assert "--device cuda" in plan[3] and "--json" in plan[3]


@pytest.mark.slow
def test_encode_bench_runs_the_fetch_and_encode_stages_as_a_user_does(tmp_path):
    """bench_encode fetches fresh shards and times `pipeline encode` in its own process (tiny ViT), reading the
    stage's own record of its rate."""
    from pipeline.store import FeatureStore

    cpu = torch.device("cpu")
    limit = {p: {"n": 128} for p in ("fp32", "bf16")}
    enc = bench.bench_encode(cpu, "fp32", True, lambda: None, tmp_path, limit, 1, model="vit_tiny_patch16_224",
                             workers=1)
    assert (enc["tokens"], enc["width"], enc["stage_images"]) == (197, 192, 48)
    assert enc["stage_img_per_s"]["n"] == 1
    assert enc["gflop_per_image"] == pytest.approx(2.15, rel=0.02)  # ViT-Ti/16: 1.08 GMACs in timm
    assert len(FeatureStore.open(tmp_path / "features.zarr").index()) == 48


def test_a_failing_stage_subprocess_is_one_user_error_with_its_last_line(tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"`pipeline encode --shards .*` failed: .*"):
        bench._pipeline("encode", "--shards", tmp_path / "no-such-shards", "--store", tmp_path / "s.zarr")
