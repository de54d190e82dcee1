"""Probe overhead: a plain forward vs the same forward with reducers on every residual stream and
with recomputed attention patterns, for each backend. Prints ratios against the plain SDPA forward
measured in the same run, plus peak memory.

    python benchmarks/probe_overhead.py                       # CPU, embedded model, T=128 and 512
    python benchmarks/probe_overhead.py --device cuda --gpu-shape llama3-8b --lengths 512 4096
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import load_probe, parser, peak_mb, row, timeit  # noqa: E402

from probes import Mean, l2_norm  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--backends", nargs="+", default=["nnsight", "transformer_lens"])
    args = p.parse_args()
    print(f"device={args.device} model={args.gpu_shape or 'embedded'} torch={torch.__version__}")
    for backend in args.backends:
        probe = load_probe(args, backend)
        n = probe.info.n_layers
        for T in args.lengths:
            toks = torch.randint(100, min(probe.info.d_vocab, 30000), (1, T), device=probe.device)
            base = timeit(lambda: probe.forward(toks), args.repeats, args.device)
            peak_mb(args.device, reset=True)
            resid = lambda: probe.run(toks, reads={f"blocks.{L}.hook_resid_post": Mean(dims=(0,), transform=l2_norm) for L in range(n)})
            t_resid = timeit(resid, args.repeats, args.device)
            m_resid = peak_mb(args.device)
            peak_mb(args.device, reset=True)
            pat = lambda: probe.run(toks, reads={f"blocks.{L}.attn.hook_pattern": Mean(dims=(0,)) for L in range(n)})
            t_pat = timeit(pat, args.repeats, args.device)
            m_pat = peak_mb(args.device)
            print(f"\n[{backend}] T={T}")
            print(row("plain forward (model's own attention)", base, base))
            print(row("+ reducers on all residual streams", t_resid, base, m_resid))
            print(row("+ attention patterns (all layers, reduced)", t_pat, base, m_pat))
        del probe


if __name__ == "__main__":
    main()
