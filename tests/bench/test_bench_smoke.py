"""bench/gpu.sh --smoke: every step of the GPU bench runs on a CPU with tiny sizes, and the
results file holds every row (model, loader, end to end, time to the first step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_gpu_bench_smoke_writes_every_row(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_BENCH_WORK=str(tmp_path / "work"))
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-bench.json").read_text())
    md = (out / "gpu-bench.md").read_text()
    assert (out / "gpu-bench-logs.txt").exists()
    logs = (out / "gpu-bench-logs.txt").read_text()

    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["status"] == "ok" for s in steps.values()), (
        {n: s["note"] for n, s in steps.items() if s["status"] != "ok"},
        logs[-3000:],
    )
    rows = report["rows"]

    # model rows: compiled setting at both batches, the efficient and candidate variants, eager
    model = {(r["variant"], r["batch"], r["part"]): r for r in rows["model"]}
    b1, b2 = report["meta"]["batches"]
    expected = [
        ("tv", b1, "model"),
        ("ours-se", b1, "model"),
        ("ours-se-eff", b1, "model"),
        ("ours-se-sharedbn", b1, "cand"),
        ("cand-se-sumfc", b1, "cand"),
        ("tv", b2, "b256"),
        ("ours-se", b2, "b256"),
        ("tv", b1, "eager"),
        ("ours-se", b1, "eager"),
        ("ours-se-eff", b1, "eager"),
    ]
    assert sorted(model) == sorted(expected)
    for key in expected:
        assert model[key]["status"] == "ok" and model[key]["img_s"] > 0, model[key]
    assert model[("ours-se", b1, "model")]["vs_tv"] > 0 and model[("ours-se-eff", b1, "model")]["vs_ours_se"] > 0
    assert model[("cand-se-sumfc", b1, "cand")]["vs_ours_se"] > 0

    # loader rows: 2 decodes x 2 worker counts, and the trainer config's model-only step
    loaders = {r["id"]: r for r in rows["loader"]}
    workers = report["meta"]["loader_workers"]
    assert len(workers) == 2
    for decode in ("workers", "device"):
        for n in workers:
            row = loaders[f"loader, decode={decode}, {n} workers"]
            assert row["img_s"] > 0 and row["vs_model_only"] > 0, row
    assert loaders["model-only, trainer config, eager (bench/train.py)"]["img_s"] > 0

    # end to end: the real trainer, warm and cold
    e2e = {r["step"]: r for r in rows["end_to_end"]}
    assert e2e["e2e-warm"]["img_s"] > 0 and e2e["e2e-warm"]["vs_model_only"] > 0
    assert e2e["e2e-cold"]["img_s"] > 0

    # time to the first step: cold and warm for every compiled setting and the trainer
    startup = {r["id"]: r for r in rows["startup"]}
    assert len(startup) == 8
    for row in startup.values():
        assert row["cold_s"] > 0 and row["warm_s"] > 0, row

    assert {t["target"] for t in report["targets"]} >= {
        f"SE on vs torchvision, {report['meta']['compile']}, batch {b1}",
        "end to end (trainer, warm) vs model-only",
    }
    for heading in (
        "## Model training step",
        "## Loader alone",
        "## End to end",
        "## Time to the first step",
        "## Targets",
        "## Steps",
    ):
        assert heading in md
    for variant in ("ours-se-sharedbn", "cand-se-sumfc", "ours-se-eff"):
        assert f"| {variant} |" in md


def test_near_search_bench_compares_both_searches_and_rates_pictures(tmp_path):
    out = tmp_path / "ns.json"
    command = [sys.executable, "-m", "bench.near_search", "--sizes", "300,3000", "--all-pairs-up-to", "300"]
    proc = subprocess.run(
        [*command, "--pictures", "12", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    small, large = report["sizes"]
    assert small["hashes"] == 300 and "ratio" in small and "all_pairs_s" not in large
    assert 0 < report["candidate_rate"]["uniform"] < 0.05 and report["candidate_rate"]["pictures"] > 0
