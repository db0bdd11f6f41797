"""bench/gpu_check.py: the prepared GPU check refuses a machine without CUDA, and its pipeline
(generate, torchrun-style train, resume, evaluate, latency, export, parity) runs end to end on the
CPU in --cpu-smoke form, so that the one GPU call it is made for cannot fail on a plain bug."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = str(REPO / "bench" / "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_what_it_needs_and_exits_3(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 3 and "needs a CUDA GPU" in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_writes_both_reports(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--cpu-smoke"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    run = report["short_run"]
    assert run["train_rc"] == run["resume_rc"] == run["evaluate_rc"] == 0 and run["final_step"] == 6
    assert {row["mode"] for row in report["training"]} >= {"fp32"}
    assert report["inference"] and report["export"]["pytorch_cpu_vs"]["onnxruntime-cpu"]["passed"]
    assert "# GPU check" in (tmp_path / "report.md").read_text() and "# GPU check" in r.stdout
