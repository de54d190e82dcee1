"""Benchmark: sink/dormant statistics throughput vs a plain forward, and memory vs corpus size.

    .venv/bin/python benchmarks/sinks.py                      # CPU, embedded model, small corpus
    .venv/bin/python benchmarks/sinks.py --device cuda --gpu-shape llama3-8b --samples 64

Prints tokens/s of (a) a plain SDPA forward and (b) one streamed statistics pass over the same batches, as
``sonde run sinks`` makes it at its defaults (α per head from recomputed patterns, value drains, key and raw value
norms, residual norms), and (c) the same pass with the next-token loss (as ``sonde run dormant`` makes it), each
as a ratio to (a) (goal ≥ 0.9). The passes alternate ``--repeats`` times and each ratio is the median of the
per-round ratios, in wall time and in this process's CPU time (the CPU ratio is the steadier one on a shared
machine). Then peak memory at 1×, 10× (and with --scale100, 100×) the corpus: the reducers' state does not grow
with the corpus, so peak memory should stay flat.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _probe(args):
    from probes import from_hf, load_model

    if args.gpu_shape is None:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    import transformers as T

    from probes.loading import resolve_dtype

    shapes = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)}
    cfg = T.LlamaConfig(**shapes[args.gpu_shape], architectures=["LlamaForCausalLM"])
    dt = resolve_dtype(args.dtype, torch.device(args.device))
    with torch.device(args.device):
        model = T.LlamaForCausalLM(cfg).to(dt).eval()
    tok = _byte_tokenizer()
    return from_hf(model, tok, name=f"random-{args.gpu_shape}")


def _byte_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    return tiny_models.tokenizer()


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-shape", default=None, choices=[None, "llama3-8b"])
    ap.add_argument("--samples", type=int, default=8, help="corpus size (sequences of T tokens)")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds of forward and statistics passes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--scales", default="1,10", help="corpus multiples whose peak memory is measured ('' for none)")
    ap.add_argument("--scale100", action="store_true", help="also run 100x the corpus")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from analyses.sinks import collect_stats

    torch.manual_seed(0)
    probe = _probe(args)
    V = min(probe.info.d_vocab, 256 if args.gpu_shape else probe.info.d_vocab)
    toks = torch.randint(4, V, (args.samples, args.T), device=probe.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def forward():
        for i in range(0, len(toks), args.batch_size):
            probe.forward(toks[i:i + args.batch_size])

    # sonde run sinks at its defaults (values, kv_norms, residual norms); dormant adds the next-token loss
    passes = {"sink stats": lambda: collect_stats(probe, toks, positions=(0,), batch_size=args.batch_size, kv_norms=True),
              "+ loss (dormant)": lambda: collect_stats(probe, toks, positions=(0,), batch_size=args.batch_size,
                                                        kv_norms=True, loss=True)}

    def timed(fn) -> tuple[float, float]:
        sync(); w, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    forward()  # warm-up
    for fn in passes.values():
        fn()
    rounds: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in passes}
    for _ in range(args.repeats):
        for name, fn in passes.items():
            rounds[name].append(timed(forward) + timed(fn))
    n_tok = toks.numel()
    load = os.getloadavg()
    print(f"model {probe.info.name} ({probe.info.n_layers} layers, {probe.info.n_heads} heads) on {probe.info.device}, "
          f"{args.samples} x {args.T} tokens, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    fw = statistics.median(r[0] for rs in rounds.values() for r in rs)
    print(f"plain forward    : {n_tok / fw:10.1f} tok/s (median wall time)")
    for name, rs in rounds.items():
        wall = statistics.median(r[0] / r[2] for r in rs)
        cpu = statistics.median(r[1] / r[3] for r in rs)
        t = statistics.median(r[2] for r in rs)
        print(f"{name:<17}: {n_tok / t:10.1f} tok/s   ratio {wall:.2f}x of forward in wall time, {cpu:.2f}x in CPU time "
              f"(goal >= 0.9; rounds {min(r[0] / r[2] for r in rs):.2f}-{max(r[0] / r[2] for r in rs):.2f})")
    scales = [int(x) for x in args.scales.split(",") if x] + ([100] if args.scale100 else [])
    for s in scales:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        big = toks.repeat(s, 1)
        t0 = time.perf_counter()
        collect_stats(probe, big, positions=(0,), batch_size=args.batch_size, kv_norms=True)
        print(f"corpus x{s:<4}: {big.shape[0]:6d} seqs  {time.perf_counter() - t0:8.2f} s  peak memory {_peak_mb(args.device):9.1f} MB")


if __name__ == "__main__":
    main()
