"""Benchmark: fiber-bundle test over the full vocabulary vs a dense-distance implementation on a subset.

    .venv/bin/python benchmarks/fiber.py                       # embedded model, full vocabulary, CPU
    .venv/bin/python benchmarks/fiber.py --tokens 0:49152:8    # a quicker partial run
    .venv/bin/python benchmarks/fiber.py --device cuda --gpu-shape llama3-8b   # random 128256 x 4096 matrix on GPU

Prints wall time, peak memory, the ratio to a plain forward pass measured in the same run, and the
ratio to a straightforward dense implementation (full V_sub x V_sub distance matrix, sorted per row,
the released script's approach) on a subset both can hold.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import fiber as F  # noqa: E402
from analyses.cli.fiber import parse_tokens  # noqa: E402

GPU_SHAPES = {"llama3-8b": (128256, 4096), "gpt2": (50257, 768), "mistral-7b": (32000, 4096)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def dense_reference(E: torch.Tensor, vol_min: int, vol_max: int) -> float:
    """Dense V x V distances (float64), full sort per row, then the same test: the released approach."""
    t0 = time.perf_counter()
    X = E.double()
    d = torch.cdist(X, X).sort(dim=1).values[:, :vol_max]
    F.stratify(d[:, vol_min:vol_max], vol_min, mode="parity", n_points=E.shape[0])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", default=None, help="rows to test (default all)")
    ap.add_argument("--vol-max", type=int, default=1000)
    ap.add_argument("--mode", default="calibrated", choices=["calibrated", "parity"])
    ap.add_argument("--dense-subset", type=int, default=8192, help="rows for the dense comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=sorted(GPU_SHAPES))
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    probe = None
    if a.gpu_shape:
        V, d = GPU_SHAPES[a.gpu_shape]
        E = torch.randn(V, d, generator=torch.Generator().manual_seed(0)) / d ** 0.5
        name = f"random {V}x{d}"
        fwd = None
    else:
        from probes import load_model

        probe = load_model(a.model, device=a.device)
        E = probe.W_E.detach().float()
        name = probe.info.name
        toks = probe.to_tokens("The quick brown fox jumps over the lazy dog. " * 10)[:, :128]
        probe.forward(toks)
        t0 = time.perf_counter()
        for _ in range(3):
            probe.forward(toks)
        fwd = (time.perf_counter() - t0) / 3
    cfg = F.Config(tokens=parse_tokens(a.tokens), vol_max=a.vol_max, mode=a.mode, device=a.device, keep_curves="none")  # type: ignore[arg-type]
    print(f"{name}: V={E.shape[0]} dim={E.shape[1]} threads={torch.get_num_threads()} device={a.device} mode={a.mode}", flush=True)
    t0 = time.perf_counter()
    res = F.run(embeddings=E if probe is None else None, config=cfg, **({"probe": probe} if probe is not None else {}))
    wall = time.perf_counter() - t0
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    n = len(res.token_strs)
    print(f"fiber test: {n} tokens in {wall:.1f} s ({n / wall:.0f} tokens/s); stages "
          + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()), flush=True)
    print(f"peak RSS {peak_rss_gb():.2f} GB")
    if fwd:
        print(f"plain forward (1x128 tokens): {fwd * 1e3:.0f} ms; fiber/forward = {wall / fwd:.0f}x")
    c = res.counts()
    print(c.to_string(index=False))
    # dense comparison on a subset, same run
    m = min(a.dense_subset, E.shape[0])
    sub = E[:m].cpu()
    td = dense_reference(sub, cfg.vol_min, min(cfg.vol_max, m))
    t0 = time.perf_counter()
    F.run(embeddings=sub, config=cfg.replace(tokens=None, vol_max=min(cfg.vol_max, m), device="cpu"))
    tb = time.perf_counter() - t0
    print(f"subset {m} rows: dense (cdist + full sort, fp64) {td:.1f} s vs blocked kNN {tb:.1f} s: {td / tb:.1f}x faster; "
          f"dense memory {m * m * 8 / 2**30:.2f} GiB vs blocked {cfg.block_size * m * 4 / 2**30:.2f} GiB")
    print(f"dense extrapolated to V={E.shape[0]}: ~{td * (E.shape[0] / m) ** 2:.0f} s and {E.shape[0] ** 2 * 8 / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
