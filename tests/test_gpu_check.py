"""The prepared GPU check (benchmarks/gpu_check.py) dry-runs on a tiny shape, so it cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

SECTIONS = ("setup", "routes", "sinks", "fiber", "counterfactual", "critical", "pytest_gpu", "agreement")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls on 2 shared cores run faster on one thread


def test_tiny_dry_run_fills_every_section(tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_GPU_CHECK_TINY", "1")  # the env switch, as the suite would set it
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["tiny"] is True
    assert {k: v["status"] for k, v in r["sections"].items()} == {k: "ok" for k in SECTIONS}
    rt = r["sections"]["routes"]["lengths"]
    assert set(rt) == {"16", "32"} and all(v["all_ratio"] > 0 and v["top_down_ratio"] > 0 for v in rt.values())
    lg = r["sections"]["routes"]["long"]  # the full-context top-down case, on the tiny shape's 128 tokens
    assert lg["T"] == 128 and lg["top_down_ratio"] > 0 and lg["visited_rows"] > 0 and "nodes" in lg["route"]
    assert r["sections"]["sinks"]["throughput_ratio"] > 0 and r["sections"]["sinks"]["alpha_finite"]
    assert r["sections"]["fiber"]["knn_all_rows_s"] >= 0 and r["sections"]["fiber"]["run_s"] >= 0
    assert r["sections"]["counterfactual"]["ratio"] > 0 and r["sections"]["critical"]["ratio"] > 0
    pg = r["sections"]["pytest_gpu"]
    assert pg["returncode"] == 0 and "-m gpu" in pg["command"] and "collected" in pg["summary"]
    ag = r["sections"]["agreement"]
    assert set(ag["big_shape"]) >= {"final_logprob_maxabs", "lens_top_probs_maxabs", "sink_alpha_maxabs"}
    assert all("error" not in m for m in ag["tiny_families"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and "| routes | all-position, T=32 |" in md and "full context T=128" in md and "| bf16 vs fp32 |" in md


def test_a_failing_or_slow_section_leaves_the_others(tmp_path):
    args = gpu_check.argparse.Namespace(tiny=True, out=str(tmp_path), sections=None)
    chk = gpu_check.Check(args)
    chk.size = dict(chk.size, budgets={"boom": 5, "slow": 1, "fine": 5})

    def boom(rec):
        rec["before"] = 1
        raise RuntimeError("CUDA error: something")

    def slow(rec):
        rec["partial"] = 2
        while True:
            time.sleep(0.05)

    chk.section("boom", boom)
    chk.section("slow", slow)
    chk.section("fine", lambda rec: rec.update(x=3))
    s = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert s["boom"]["status"].startswith("error: RuntimeError: CUDA error") and s["boom"]["before"] == 1
    assert s["slow"]["status"].startswith("timeout") and s["slow"]["partial"] == 2 and s["slow"]["seconds"] < 10
    assert s["fine"] == {"x": 3, "status": "ok", "seconds": s["fine"]["seconds"]}
    assert "| boom | status | error: RuntimeError" in (tmp_path / "gpu_check.md").read_text()


def test_full_check_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("SONDE_GPU_CHECK_TINY", raising=False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--tiny" in err[0]
    assert not any(tmp_path.iterdir())


def test_wrapper_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
