"""Benchmark: fiber-bundle test over the full vocabulary vs a dense-distance implementation on a subset.

    .venv/bin/python benchmarks/fiber.py                       # embedded model, full vocabulary, CPU
    .venv/bin/python benchmarks/fiber.py --tokens 0:49152:8    # a quicker partial run
    .venv/bin/python benchmarks/fiber.py --device cuda --gpu-shape llama3-8b   # random 128256 x 4096 matrix on GPU
    .venv/bin/python benchmarks/fiber.py --power                # power on synthetic clouds: parity, previous and current calibration

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


# ---------------------------------------------------------------------------------------------- power
def _previous_calibration(vol_min: int, vol_max: int, ws: int, n_sims: int = 4000, seed: int = 0, q_ref: float = 0.02) -> dict:
    """The calibration calibrated mode used before (kept here to compare): the Welch scan's minimum p, an
    effective number of tests fitted at the 2 % quantile of simulated scans, extrapolated in proportion to z(p)."""
    import math

    from scipy.stats import norm

    g = torch.Generator().manual_seed(seed)
    gam = torch.empty(n_sims, vol_max, dtype=torch.float64).exponential_(1.0, generator=g).cumsum(1)
    st = torch.zeros(n_sims, dtype=torch.long)
    minp = F.welch_scan(F.pointwise_slopes(gam.log()[:, vol_min:vol_max], torch.arange(vol_min, vol_max).double().log(), st), st, ws).min(1)
    x_ref = float(np.quantile(minp, q_ref))
    return {"m_ref": max(1.0, math.log1p(-q_ref) / math.log1p(-max(x_ref, 1e-300))), "z_ref": float(norm.isf(x_ref / 2))}


def _previous_p(radii: torch.Tensor, vol_min: int, ws: int, cal: dict) -> np.ndarray:
    """Token p of the previous calibrated mode (first scan)."""
    from scipy.stats import norm

    lr = torch.where(radii > 1e-10, radii.clamp_min(1e-300).log(), torch.full_like(radii, -np.inf))
    st = (radii > 1e-10).double().argmax(1)
    p = F.welch_scan(F.pointwise_slopes(lr, torch.arange(vol_min, vol_min + radii.shape[1]).double().log(), st), st, ws).min(1)
    m = cal["m_ref"] * np.maximum(1.0, norm.isf(np.clip(p, 1e-300, 1.0) / 2) / cal["z_ref"])
    return np.clip(-np.expm1(m * np.log1p(-np.clip(p, 0.0, 1.0 - 1e-16))), 0.0, 1.0)


def _sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def power_clouds() -> list[tuple[str, np.ndarray, dict[str, np.ndarray], int, int, float]]:
    """(name, points, {group: rows}, vol_min, vol_max, alpha) for the synthetic checks."""
    rng = np.random.default_rng(0)
    s = _sphere(500, rng)
    s[:, 0] -= 1
    stick = np.zeros((1000, 3))
    stick[:, 0] = np.linspace(0, 5, 1000)
    lol = np.vstack([s, stick])
    x = stick[:, 0]
    lol_groups = {"junction (stick x <= 0.5)": 500 + np.nonzero(x <= 0.5)[0],
                  "stick middle (1.5 <= x <= 3.5)": 500 + np.nonzero((x >= 1.5) & (x <= 3.5))[0],
                  "free end (x >= 4.5)": 500 + np.nonzero(x >= 4.5)[0], "sphere": np.arange(0, 500, 5)}
    stick_r = np.zeros((1000, 3))  # the same stick with uniformly random positions (no lattice of equal spacings)
    stick_r[:, 0] = np.sort(rng.uniform(0, 5, 1000))
    lol_r = np.vstack([s, stick_r])
    xr = stick_r[:, 0]
    lolr_groups = {"junction (stick x <= 0.5)": 500 + np.nonzero(xr <= 0.5)[0],
                   "stick middle (1.5 <= x <= 3.5)": 500 + np.nonzero((xr >= 1.5) & (xr <= 3.5))[0],
                   "free end (x >= 4.5)": 500 + np.nonzero(xr >= 4.5)[0], "sphere": np.arange(0, 500, 5)}
    sp = _sphere(2000, rng)
    rho = 2 * np.sqrt(rng.uniform(size=4000))  # uniform disc of radius 2 in the plane z = 0, through the equator
    th = rng.uniform(0, 2 * np.pi, 4000)
    pl = np.column_stack([rho * np.cos(th), rho * np.sin(th), np.zeros(4000)])
    swp = np.vstack([sp, pl])
    near_s = np.nonzero(np.abs(sp[:, 2]) < 0.05)[0]
    near_p = 2000 + np.nonzero(np.abs(rho - 1) < 0.05)[0]
    swp_groups = {"intersection (within 0.05 of the circle)": np.concatenate([near_s, near_p]),
                  "sphere, |z| > 0.7": np.nonzero(np.abs(sp[:, 2]) > 0.7)[0][:200],
                  "plane, 1.3 < rho < 1.6": 2000 + np.nonzero((rho > 1.3) & (rho < 1.6))[0][:200]}
    return [("lollipop (page check 2)", lol, lol_groups, 5, 200, 1e-2),
            ("lollipop, random stick positions", lol_r, lolr_groups, 5, 200, 1e-2),
            ("sphere with plane", swp, swp_groups, 10, 300, 1e-3)]


def power() -> None:
    """Fraction of tokens flagged per group: parity, previous calibrated mode, current calibrated mode (and the
    fraction of those with a slope increase), current calibrated mode with window 25."""
    print("power: fraction of tokens that reject 'manifold' (no vocabulary correction)")
    for name, X, groups, vmin, vmax, alpha in power_clouds():
        q = tuple(int(i) for g in groups.values() for i in g)
        par = F.run(embeddings=X, config=F.Config(vol_min=vmin, vol_max=vmax, alpha=alpha, mode="parity", tokens=q, keep_curves="none"))
        cal = F.run(embeddings=X, config=F.Config(vol_min=vmin, vol_max=vmax, alpha=alpha, tokens=q, keep_curves="all"))
        prev = _previous_p(cal.radii[:, vmin:vmax].double(), vmin, 10, _previous_calibration(vmin, vmax, 10)) < alpha
        wide = F.run(embeddings=X, config=F.Config(vol_min=vmin, vol_max=vmax, alpha=alpha, tokens=q, window=25, keep_curves="none"))
        vp, vc, vw = par.verdicts(), cal.verdicts(), wide.verdicts()
        print(f"\n{name}: {len(X)} points, volumes {vmin}-{vmax}, alpha {alpha:g}")
        print(f"  {'group':40s} {'n':>5s} {'parity':>7s} {'previous':>9s} {'current':>8s} {'(increase)':>11s} {'current ws=25':>14s}")
        i = 0
        for g, rows in groups.items():
            sl = slice(i, i + len(rows))
            i += len(rows)
            inc = vc["reject_fb_small"][sl] | vc["reject_fb_large"][sl]
            print(f"  {g:40s} {len(rows):5d} {vp['reject_manifold'][sl].mean():7.2f} {prev[sl].mean():9.2f} "
                  f"{vc['reject_manifold'][sl].mean():8.2f} {inc.mean():11.2f} {vw['reject_manifold'][sl].mean():14.2f}")


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
    ap.add_argument("--power", action="store_true", help="only the power comparison on synthetic clouds")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.power:
        power()
        return
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
