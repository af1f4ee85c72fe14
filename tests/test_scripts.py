"""The study scripts (scripts/ceilings.py, scripts/probe_features.py) run end to end at tiny sizes,
so the figures docs/TRAINING.md cites can be made again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline import captions, metrics

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_study_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mode_caption_takes_each_positions_most_frequent_token():
    ceilings = _script("ceilings")
    rows = [[1, 2, 9], [1, 3, 9], [4, 2, 5, 9]]  # ids + EOS (9)
    assert ceilings.mode_caption(rows, 5, eos=9) == [1, 2, 9, 9, 9]  # past every row: EOS


@pytest.mark.slow  # the COCO scorers run Java
def test_ceilings_script_on_a_small_draw(tmp_path):
    ceilings = _script("ceilings")
    out, png = tmp_path / "ceilings.json", tmp_path / "ceilings.png"
    assert ceilings.main(["--count", "300", "--samples", "20", "--oracle-rows", "40",
                          "--pool-rows", "400", "--pool-samples", "3", "--cue-rows", "2000",
                          "--json", str(out), "--out", str(png)]) == 0
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert 0.1 < res["ambiguous_share"] < 0.4
    for a in captions.ATTRIBUTES:
        assert res["chance"][a] <= res["ceiling"][a] <= 1.0
    # an ambiguous primary is a single object, like the others
    assert res["ceiling"]["count"] == 1.0
    assert res["ceiling"]["colour"] < 1.0
    cues = res["cue_check"]["picks_primary"]
    assert 0 < cues["uniform"] < 1 and set(cues) >= {"uniform", "largest", "topmost"}
    oracles = res["parallel_oracle"]["oracles"]
    assert set(oracles) == set(ceilings.GIVEN)
    scene, blind = oracles["scene"], oracles["nothing (blind)"]
    assert scene["cider"] > blind["cider"]
    assert scene["attributes"]["colour"] > blind["attributes"]["colour"]
    assert all(0.0 <= o["whole"] <= 1.0 for o in oracles.values())


@pytest.mark.slow
def test_probe_script_on_the_tiny_store_and_run(tiny_shards, tiny_store, tiny_run, tmp_path):
    probe = _script("probe_features")
    out, png = tmp_path / "probes.json", tmp_path / "probes.png"
    images = tiny_shards.parent / "synthetic" / "images"
    args = ["--store", str(tiny_store), "--run", str(tiny_run), "--images", str(images),
            "--val-fraction", "0.3", "--attn-epochs", "2", "--json", str(out), "--out", str(png)]
    assert probe.main(args + ["--probes", "cls,attn,pixels16", "--decoder", "--refine-steps",
                              "0,1"]) == 0
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert res["random_init"] is True and set(res["probes"]) == {"cls", "attn", "pixels16"}
    n_val = res["split"]["val"]
    # --val-fraction 0.3 of the ~93 fetched rows
    assert n_val > 10 and res["split"]["train"] > 2 * n_val
    for p in res["probes"].values():
        for a in captions.ATTRIBUTES:
            lo, hi = p[a]["val_ci95"]
            assert 0.0 <= p[a]["val"] <= 1.0 and lo <= p[a]["val"] <= hi
    modes = res["decoder_refinement"]["modes"]
    assert {"refine_0", "refine_1"} <= set(modes)
    for m in (modes["refine_0"], modes["refine_1"]):
        # METEOR skipped, as the script says
        assert set(m["coco"]) == set(metrics.METRICS) - {"METEOR"}
        assert all(0.0 <= v <= 1.0 for k, v in m["coco"].items() if k != "CIDEr")
        assert 0.0 <= m["coco"]["CIDEr"] <= 10.0  # CIDEr-D: 10 x a mean cosine similarity
        assert len(m["first_captions"]) == 3
    # --update keeps what this call does not recompute
    assert probe.main(args + ["--probes", "mean", "--update"]) == 0
    res2 = json.loads(out.read_text())
    assert set(res2["probes"]) == {"cls", "attn", "pixels16", "mean"}
    assert res2["probes"]["cls"] == res["probes"]["cls"] and "decoder_refinement" in res2


def test_profile_step_measures_the_trainers_step_at_tiny_size(tmp_path):
    """scripts/profile_step.py (docs/BENCHMARKS.md's step profile) on a 1 x 64 decoder: autocast's
    bf16 step casts far more than the fp32 one, the profiler sees the step's matmuls, and the JSON is
    written."""
    profile = _script("profile_step")
    tiny = ["--layers", "1", "--width", "64", "--heads", "4", "--mlp-dim", "128", "--steps", "2",
            "--warmup", "1", "--profile-steps", "1", "--image-tokens", "5", "--image-width", "16",
            "--parallel-len", "8", "--batch-size", "4"]
    out = tmp_path / "p.json"
    fp32 = profile.main(["--precision", "fp32", *tiny, "--json", str(out)])
    bf16 = profile.main(["--precision", "bf16", *tiny])
    assert json.loads(out.read_text())["steps"] == fp32["steps"]
    assert fp32["census"]["cast_calls"] * 5 < bf16["census"]["cast_calls"]
    assert fp32["ops"]["of_interest"]["aten::mm"]["calls_per_step"] > 0
    assert 0 <= fp32["kernel_share"] < 1 and fp32["median"]["wall_s"] > 0
