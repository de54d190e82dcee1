"""Benchmark: fiber-bundle test over the full vocabulary vs a dense-distance implementation on a subset.

    .venv/bin/python benchmarks/fiber.py                       # embedded model, full vocabulary, CPU
    .venv/bin/python benchmarks/fiber.py --tokens 0:49152:8    # a quicker partial run
    .venv/bin/python benchmarks/fiber.py --device cuda --gpu-shape llama3-8b   # random 128256 x 4096 matrix on GPU
    .venv/bin/python benchmarks/fiber.py --power                # detection rates on synthetic clouds, with two oracles

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
POWER_ALPHAS = (1e-3, 1e-2)
POWER_VOLUMES = (10, 200)


def _sphere(n: int, rng: np.random.Generator | None, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``n`` points on a unit sphere: uniform at random, or (``rng=None``) a Fibonacci lattice (the oracle's reference)."""
    if rng is None:
        i = np.arange(n) + 0.5
        z, ph = 1 - 2 * i / n, np.pi * (1 + 5 ** 0.5) * i
        x = np.column_stack([np.sqrt(1 - z * z) * np.cos(ph), np.sqrt(1 - z * z) * np.sin(ph), z])
    else:
        x = rng.normal(size=(n, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x + np.asarray(center)


def _unit(n: int, rng: np.random.Generator | None, k: int = 2) -> np.ndarray:
    """``[n, k]`` uniform numbers in [0, 1): at random, or (``rng=None``) a low-discrepancy (Kronecker) sequence."""
    if rng is not None:
        return np.column_stack([rng.uniform(size=n) for _ in range(k)])
    g = 0.5 + 0.5 * 5 ** 0.5 if k == 1 else 1.32471795724474602596  # golden ratio; plastic number (Roberts' R2 sequence)
    return np.mod(0.5 + np.arange(n)[:, None] / g ** np.arange(1, k + 1)[None, :], 1.0)


def _lollipop(rng, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A ``4000m``-point unit sphere centred at (-1, 0, 0) touching a ``300m``-point stick [0, 5] on the x axis."""
    s = _sphere(4000 * m, rng, (-1.0, 0.0, 0.0))
    x = 5 * _unit(300 * m, rng, 1)[:, 0]
    X = np.vstack([s, np.column_stack([x, np.zeros_like(x), np.zeros_like(x)])])
    return X, np.r_[np.zeros(4000 * m, int), np.ones(300 * m, int)]


def _sphere_plane(rng, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A ``2000m``-point unit sphere and a ``4000m``-point disc of radius 2 through its equator."""
    sp = _sphere(2000 * m, rng)
    u = _unit(4000 * m, rng)
    rho, th = 2 * np.sqrt(u[:, 0]), 2 * np.pi * u[:, 1]
    X = np.vstack([sp, np.column_stack([rho * np.cos(th), rho * np.sin(th), np.zeros_like(rho)])])
    return X, np.r_[np.zeros(2000 * m, int), np.ones(4000 * m, int)]


def _cone(rng, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The double cone z² = x² + y², |z| ≤ 1, uniform by area (``2 × 2000m`` points): the apex is singular."""
    u = _unit(4000 * m, rng)
    t, ph = np.sqrt(u[:, 0]), 2 * np.pi * u[:, 1]  # area density grows linearly with the distance to the apex
    sg = np.where(np.arange(4000 * m) < 2000 * m, 1.0, -1.0)
    return np.column_stack([t * np.cos(ph), t * np.sin(ph), sg * t]), (sg > 0).astype(int)


def _touching(rng, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two unit spheres touching at the origin (``2 × 2000m`` points)."""
    X = np.vstack([_sphere(2000 * m, rng, (-1.0, 0.0, 0.0)), _sphere(2000 * m, rng, (1.0, 0.0, 0.0))])
    return X, np.r_[np.zeros(2000 * m, int), np.ones(2000 * m, int)]


def power_clouds(seed: int = 0) -> list[dict]:
    """Randomly sampled clouds with a known singular set: ``{"name", "X", "labels", "groups", "make"}``.

    ``labels`` names the smooth piece of each point; the change rank of a query is the rank of its first
    neighbour on another piece. ``groups`` maps a group name to query rows (empty: the band of queries whose
    change rank lies in the volume range, and "far", change rank beyond twice ``vol_max``). ``make(rng, m)``
    draws the cloud (one copy of it) with ``m`` times the points (``rng=None``: a low-discrepancy lattice, the
    oracle's reference)."""
    rng = np.random.default_rng(seed)
    out = []
    # lollipop: 5 independent copies, so that enough stick points lie near a junction
    Xs, labs, gs = [], [], {}
    for c in range(5):
        X, lab = _lollipop(rng)
        x = X[lab == 1, 0]
        Xs.append(X + [0.0, 10.0 * c, 0.0])
        labs.append(lab + 2 * c)
        for g, m in (("junction: stick x <= 0.25", x <= 0.25), ("junction: stick x <= 0.5", x <= 0.5),
                     ("stick middle (2 <= x <= 3)", (x >= 2) & (x <= 3)), ("free end (x >= 4.75)", x >= 4.75)):
            gs.setdefault(g, []).append(4300 * c + 4000 + np.nonzero(m)[0])
    out.append({"name": "lollipop (sphere 4000 + stick 300, 5 copies)", "X": np.vstack(Xs), "labels": np.concatenate(labs),
                "groups": {g: np.concatenate(v) for g, v in gs.items()}, "make": _lollipop, "copy": (4300, 10.0)})
    for name, make in (("sphere crossing a plane (2000 + 4000)", _sphere_plane), ("double cone (2 x 2000)", _cone),
                       ("two touching spheres (2 x 2000)", _touching)):
        X, lab = make(rng)
        out.append({"name": name, "X": X, "labels": lab, "groups": {}, "make": make, "copy": None})
    return out


def _change_rank(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Rank of each point's first neighbour on another piece (``k`` when none among its ``k`` nearest)."""
    _, idx = F.knn_distances(torch.from_numpy(X), k, exact="all")
    other = labels[idx.numpy()] != labels[:, None]
    return np.where(other.any(1), other.argmax(1), k)


ORACLE_REFERENCE = 40  # the oracle's reference lattice has this many times the cloud's points


def growth_exponent(P: np.ndarray, make, ranks: np.ndarray, m: int = ORACLE_REFERENCE) -> np.ndarray:
    """The expected local growth exponent ``g = d log N / d log r`` of the cloud around each point of ``P [q, 3]``,
    at the radius where the expected neighbour count ``N`` reaches each of ``ranks`` ``[n]`` → ``[q, n]``.

    ``N`` is counted on a low-discrepancy lattice of the same pieces with ``m`` times the points (the ``K``-th nearest
    lattice point, 1-based, is at count ``K / m``), and ``g`` is the slope of ``log N`` against ``log r`` over ranks ``k/1.03 … 1.03·k``."""
    R, _ = make(None, m)
    K = int(np.ceil(1.03 * ranks.max() * m)) + 2
    Rt = torch.from_numpy(R).double()
    d = np.concatenate([torch.cdist(torch.from_numpy(P[s:s + 64]).double(), Rt).topk(K, largest=False).values.sort(1).values.numpy()
                        for s in range(0, len(P), 64)])
    lo = np.clip(np.round(ranks / 1.03 * m).astype(int), 1, K)  # 1-based lattice ranks
    hi = np.clip(np.round(ranks * 1.03 * m).astype(int), 2, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (np.log(hi) - np.log(lo))[None, :] / (np.log(d[:, hi - 1]) - np.log(d[:, lo - 1]))
    return np.where(np.isfinite(g) & (g > 0), g, np.nan)


def np_oracle_p(y: np.ndarray, g: np.ndarray, change: np.ndarray, vol_min: int, *, n_null: int = 50000, seed: int = 7
                ) -> np.ndarray:
    """p of the Neyman–Pearson test that knows the alternative's shape and where the other piece enters.

    ``g [q, n]`` is the expected growth exponent at each score's rank (:func:`growth_exponent`); it is shifted so that
    its first departure from its starting value (by 25 %, after a running median of 7 ranks) falls on the observed change rank ``change [q]``. Under the
    alternative ``Y_k ~ Exp(D·w_k)`` with ``w ∝ g``; the most powerful scale-invariant test rejects for small
    ``T = Σ w_k Y_k / Σ Y_k``, whose null law (iid exponentials) is simulated once."""
    q, n = y.shape
    ks = vol_min + np.arange(n)
    W = np.ones((q, n))
    for i in range(q):
        gi = g[i]
        ok = np.isfinite(gi)
        if ok.sum() < 2:
            continue
        gi = np.interp(ks, ks[ok], gi[ok])
        gi = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(gi, 3, mode="edge"), 7), axis=1)  # lattice noise
        dev = np.nonzero(np.abs(gi / np.median(gi[:7]) - 1) > 0.25)[0]
        shift = (ks[dev[0]] - change[i]) if dev.size else 0
        W[i] = np.interp(np.clip(ks + shift, ks[0], ks[-1]), ks, gi)
    W /= W.mean(1, keepdims=True)
    T = (W * y).sum(1) / y.sum(1)
    E = np.random.default_rng(seed).exponential(size=(n_null, n))
    T0 = (E @ W.T) / E.sum(1, keepdims=True)
    return ((T0 <= T[None, :]).sum(0) + 1) / (n_null + 1)


def power_table(vol_min: int = POWER_VOLUMES[0], vol_max: int = POWER_VOLUMES[1], alphas=POWER_ALPHAS, seed: int = 0,
                max_per_group: int = 300) -> list[dict]:
    """Detection rates of calibrated mode (verdict "singular", no vocabulary correction) per cloud and group, at
    each alpha, beside two oracles that know the change rank, and parity mode (the published procedure, which
    over-rejects smooth clouds). ``oracle``: the exact two-segment test at the known split (a step, no scan);
    ``np oracle``: the Neyman–Pearson test with the alternative's shape as well (:func:`np_oracle_p`)."""
    rows = []
    rng = np.random.default_rng(seed + 1)
    for cl in power_clouds(seed):
        X, lab = cl["X"], cl["labels"]
        kch = _change_rank(X, lab, 2 * vol_max)
        groups = dict(cl["groups"])
        if not groups:
            groups = {f"band: other piece enters at neighbour {vol_min}-{vol_max}": np.nonzero((kch >= vol_min) & (kch < vol_max))[0],
                      f"far: other piece beyond neighbour {2 * vol_max}": np.nonzero(kch >= 2 * vol_max)[0]}
        groups = {g: (np.sort(rng.choice(r, max_per_group, replace=False)) if len(r) > max_per_group else r) for g, r in groups.items()}
        q = np.unique(np.concatenate(list(groups.values())))
        pos = {int(i): j for j, i in enumerate(q)}
        res = F.run(embeddings=X, config=F.Config(vol_min=vol_min, vol_max=vol_max, alpha=max(alphas), tokens=tuple(int(i) for i in q),
                                                  keep_curves="none", exact="all"))
        par = F.run(embeddings=X, config=F.Config(vol_min=vol_min, vol_max=vol_max, alpha=max(alphas), tokens=tuple(int(i) for i in q),
                                                  keep_curves="none", exact="all", mode="parity"))
        p_par = par.p_manifold.numpy()
        dist, _ = F.knn_distances(torch.from_numpy(X), vol_max, queries=torch.from_numpy(q), exact="all")
        r = dist[:, vol_min:vol_max]
        y = F.spacing_scores(r.log(), torch.arange(vol_min, vol_max).double(), torch.zeros(len(q), dtype=torch.long)).numpy()[:, :-1]
        split = np.clip(kch[q] - vol_min - 1, 1, y.shape[1] - 1)
        p_or, _ = F.split_p(y, split)
        P = X[q]
        if cl["copy"] is not None:  # copies of one cloud, side by side: back to the first copy's place
            P = P.copy()
            P[:, 1] -= cl["copy"][1] * (q // cl["copy"][0])
        g = growth_exponent(P, cl["make"], vol_min + np.arange(y.shape[1]))
        p_np = np_oracle_p(y, g, kch[q], vol_min)
        has_change = (kch[q] >= vol_min) & (kch[q] < vol_max)
        pm, pg = res.p_manifold.numpy(), res.p_gap.numpy()
        rise = res.seg_rise.numpy()[:, 0]
        for gname, rws in groups.items():
            j = np.array([pos[int(i)] for i in rws])
            row = {"cloud": cl["name"], "group": gname, "n": len(j), "in_range": float(has_change[j].mean())}
            for a in alphas:
                sing = pm[j] < a
                row[f"singular@{a:g}"] = float(sing.mean())
                row[f"rise@{a:g}"] = float((sing & rise[j]).mean())
                row[f"gap@{a:g}"] = float((~sing & (pg[j] < a)).mean())
                row[f"parity@{a:g}"] = float((p_par[j] < a).mean())
                anyc = has_change[j].any()
                row[f"oracle@{a:g}"] = float((has_change[j] & (p_or[j] < a)).mean()) if anyc else float("nan")
                row[f"np_oracle@{a:g}"] = float((has_change[j] & (p_np[j] < a)).mean()) if anyc else float("nan")
            rows.append(row)
    return rows


def power_markdown(rows: list[dict], alphas=POWER_ALPHAS) -> str:
    """The power table as Markdown: detection, both oracles and parity per alpha."""
    head = ["cloud", "group", "n", *[f"α = {a:g}: singular (rise) / step oracle / NP oracle / parity" for a in alphas]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pc(v: float) -> str:
        return "—" if v != v else f"{100 * v:.0f} %"

    for r in rows:
        cells = [r["cloud"], r["group"], str(r["n"])]
        cells += [f"{pc(r[f'singular@{a:g}'])} ({pc(r[f'rise@{a:g}'])}) / {pc(r[f'oracle@{a:g}'])} / {pc(r[f'np_oracle@{a:g}'])} / "
                  f"{pc(r[f'parity@{a:g}'])}" for a in alphas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def power(vol_min: int = POWER_VOLUMES[0], vol_max: int = POWER_VOLUMES[1]) -> None:
    """Print the power table (calibrated mode, volumes vol_min-vol_max, no vocabulary correction)."""
    t0 = time.perf_counter()
    rows = power_table(vol_min, vol_max)
    print(f"power: calibrated mode, volumes {vol_min}-{vol_max}, no vocabulary correction; fraction of the group's points with "
          "verdict 'singular' (in brackets: with a dimension rise at the change) / step oracle (exact two-segment test at the "
          "known change rank) / NP oracle (Neyman-Pearson test with the known change rank and growth law) / "
          "parity mode (published procedure, its own p < alpha)")
    print(power_markdown(rows))
    gaps = [f"{r['cloud'][:20]}… / {r['group'][:20]}…: {100 * r['gap@0.001']:.0f} %" for r in rows if r["gap@0.001"] > 0]
    print("verdict 'gap' at alpha 1e-3: " + (", ".join(gaps) or "none"))
    print(f"({time.perf_counter() - t0:.0f} s)")


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
    ap.add_argument("--power", action="store_true", help="only the detection rates on synthetic clouds (volumes 10-200)")
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
