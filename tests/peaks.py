"""Peak resident memory of code run in a fresh subprocess (Linux): the planner tests compare their estimates with it.

``measure(body, threads=...)`` runs ``body`` after a prelude that loads the embedded model and defines
``peak(fn)`` (bytes above the resident memory before ``fn``: VmHWM after a clear_refs reset); ``body`` fills a dict
``out`` of named peaks, which ``measure`` returns. The subprocess's malloc returns every large block at once (a fixed
mmap threshold), so resident memory follows the live tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
import json, re, sys, gc, torch
def status(k):
    return int(re.search(k + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def peak(fn):
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM (peak RSS) to the current RSS
    fn()
    return status("VmHWM") - base
from probes import load_model
probe = load_model("embedded", backend="nnsight", device="cpu")
probe.run(torch.randint(10, 1000, (1, 8)), return_logits=False)  # warm-up (lazy inits, thread pools)
out = {}
"""

needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")


def measure(body: str, *, threads: int, timeout: float) -> dict[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    code = PRELUDE + body + "\nprint(json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
