"""CPU thread policy: the same work with torch's idle OpenMP workers spinning (libgomp's default) and sleeping
(``OMP_WAIT_POLICY=PASSIVE``, which ``sonde dashboard`` and the parallel test processes set), on an idle machine
and with one other busy process (as a browser drawing a page on the same machine).

    python benchmarks/cpu_threads.py [--repeats 2] [--samples 16]

Each policy runs in a fresh process (the OpenMP runtime reads the policy once, when torch loads), alternating, on
the embedded model: a plain Hugging Face forward pass (batch 8 x 64 tokens and 1 x 10), the logit lens of a
10-token prompt and a sinks run (``--samples`` texts of 64 tokens, nnsight backend). Prints each policy's median
seconds (each a median after one warm-up run) and the ratio spinning / sleeping (above 1: sleeping is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORK = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from _common import timeit  # median of the repeats after one warm-up
from probes import load_model
from probes.loading import embedded_model_dir
from analyses import logit_lens, sinks

n = int(sys.argv[1])
out = {"threads": torch.get_num_threads()}
hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
x8, x1 = torch.randint(0, 49152, (8, 64)), torch.randint(0, 49152, (1, 10))
with torch.inference_mode():
    out["hf forward 8x64"] = timeit(lambda: hf(x8), 3, "cpu")
    out["hf forward 1x10"] = timeit(lambda: hf(x1), 10, "cpu")
del hf
probe = load_model("embedded", device="cpu")
prompt = "The Eiffel Tower is located in the city of"
out["logit lens, 10 tokens"] = timeit(lambda: logit_lens.run(probe, prompt), 3, "cpu")
out[f"sinks, {n} texts x 64"] = timeit(lambda: sinks.run(probe, domain="prose", config=sinks.Config(n_samples=n, batch_size=8)), 1, "cpu")
print("RESULT " + json.dumps(out))
"""

def once(policy: str, samples: int, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy == "sleep":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        p = subprocess.run([sys.executable, "-c", WORK, str(samples)], env=env, cwd=ROOT, capture_output=True, text=True)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"error: the {policy} run failed:\n{p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    a = ap.parse_args()
    runs: dict[tuple, list[dict]] = {}
    for _ in range(a.repeats):
        for busy in (False, True):
            for policy in ("spin", "sleep"):
                runs.setdefault((busy, policy), []).append(once(policy, a.samples, busy))
    first = runs[(False, "spin")][0]
    print(f"torch threads: {first['threads']} on {os.cpu_count()} cores; {a.repeats} runs per case, medians")
    for busy in (False, True):
        print("with one other busy process:" if busy else "idle machine:")
        for k in (k for k in first if k != "threads"):
            spin = statistics.median(r[k] for r in runs[(busy, "spin")])
            sleep = statistics.median(r[k] for r in runs[(busy, "sleep")])
            print(f"  {k}: spinning {spin:.3f} s, sleeping (PASSIVE) {sleep:.3f} s, ratio {spin / sleep:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
