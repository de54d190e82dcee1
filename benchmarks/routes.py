"""Benchmark: information-flow routes (all positions, and top-down for one prediction) against a plain forward pass of the same input.

    .venv/bin/python benchmarks/routes.py                       # embedded SmolLM2-135M on CPU, T=128
    .venv/bin/python benchmarks/routes.py --lengths 128 512
    .venv/bin/python benchmarks/routes.py --device cuda --gpu-shape llama3-8b --lengths 512
    .venv/bin/python benchmarks/routes.py --long                # top-down at T=4096 and 8192: time and peak memory

Prints, per prompt length, the forward time, the routes time (hooks + proximities, one pass), their
ratio, the graph/route extraction time and the peak memory (CUDA: max allocated; CPU: process max RSS).
The GPU shape builds a random-weight model from a config (no download).

``--long`` (lengths default 4096 8192) runs each measurement in a fresh process, so each peak RSS is that of one
job: a plain forward pass, top-down routes to the last token (``mode="route"``) and the all-position length check.
A length whose routes would not fit ``--max-memory-gb`` is refused by routes itself, before the forward pass,
and the refusal (with the length that fits) is printed in place of the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, head_dim=64),
}


def build_probe(args):
    from probes import from_hf, load_model

    if args.gpu_shape is None:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    import transformers as T

    import tiny_models

    cfg = T.LlamaConfig(**SHAPES[args.gpu_shape], architectures=["LlamaForCausalLM"])
    dt = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    return from_hf(model, tiny_models.tokenizer(), name=f"random-{args.gpu_shape}")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, repeat):
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved(fns: dict, dev, repeat: int) -> dict:
    """Best wall and process-CPU seconds of each function, the functions run in turn ``repeat`` times: on a shared
    machine the load drifts, and taking turns exposes each to the same drift. CPU seconds (every thread of this
    process) are the steadier figure under load."""
    best = {k: [float("inf"), float("inf")] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync(dev)
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync(dev)
            best[k][0] = min(best[k][0], time.perf_counter() - w)
            best[k][1] = min(best[k][1], time.process_time() - c)
    return best


def _load() -> str:
    """The 1-, 5- and 15-minute load averages (a shared machine's timings are only comparable at similar load)."""
    import os

    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _peak_mb(dev) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One long-prompt job in this process: print one JSON line (seconds, peak MB, or the refusal)."""
    from analyses import routes
    from probes import OutOfMemoryError

    probe = build_probe(args)
    dev = probe.device
    T = args.child_len
    ids = torch.randint(4, min(probe.info.d_vocab, 30000), (1, T), generator=torch.Generator().manual_seed(T)).to(dev)
    base = _peak_mb(dev)
    out = {"job": args.child, "T": T, "loaded_mb": round(base)}
    try:
        t0 = time.perf_counter()
        i = probe.info
        if args.child == "all" and T <= routes.max_prompt_tokens(i.n_layers, i.n_heads, args.max_memory_gb):
            print(json.dumps({**out, "skipped": f"fits (all-position limit "
                              f"{routes.max_prompt_tokens(i.n_layers, i.n_heads, args.max_memory_gb)}); not timed here",
                              "peak_mb": round(_peak_mb(dev))}), flush=True)
            return
        if args.child == "forward":
            probe.forward(ids)
        else:
            cfg = routes.Config(mode="route" if args.child == "route" else "all", max_memory_gb=args.max_memory_gb,
                                kernel=args.kernel)
            res = routes.run(probe, ids, config=cfg)
            r = res.route()
            rows = "" if res.computed is None else f", {int(res.computed.sum())} rows computed"
            out["route"] = f"{r.number_of_nodes()} nodes, {r.number_of_edges()} edges{rows}"
        sync(dev)
        out["seconds"] = round(time.perf_counter() - t0, 2)
    except OutOfMemoryError as e:
        out["refused"] = str(e).splitlines()[0]
    out["peak_mb"] = round(_peak_mb(dev))
    print(json.dumps(out), flush=True)


def long_prompts(args) -> None:
    """Forward, top-down and all-position jobs per length, each in its own process (peak RSS per job)."""
    lengths = args.lengths if args.lengths != [128] else [4096, 8192]
    print(f"long prompts on {args.model} ({args.device}), max_memory_gb={args.max_memory_gb}; one process per job")
    print(f"{'T':>6} {'job':>8} {'seconds':>9} {'ratio':>7} {'peak MB':>9} {'x fwd peak':>10}  note")
    for T in lengths:
        fwd = None
        for job in ("forward", "route", "all"):
            cmd = [sys.executable, __file__, "--child", job, "--child-len", str(T), "--model", args.model, "--device", args.device,
                   "--dtype", args.dtype, "--max-memory-gb", str(args.max_memory_gb), "--kernel", args.kernel]
            if args.gpu_shape:
                cmd += ["--gpu-shape", args.gpu_shape]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith("{")), None)
            if line is None:
                print(f"{T:>6} {job:>8}  failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
                continue
            o = json.loads(line)
            if job == "forward":
                fwd = o
            ratio = f"{o['seconds'] / fwd['seconds']:.1f}" if "seconds" in o and fwd and job != "forward" else ""
            mem = f"{o['peak_mb'] / fwd['peak_mb']:.2f}" if fwd else ""
            print(f"{T:>6} {job:>8} {o.get('seconds', float('nan')):>9.2f} {ratio:>7} {o['peak_mb']:>9} {mem:>10}  "
                  f"{o.get('refused') or o.get('skipped') or o.get('route', '')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk-mb", type=int, default=256)
    ap.add_argument("--kernel", choices=["auto", "compiled", "eager"], default="compiled",
                    help="proximity kernel (compiled = torch.compile: C++ on CPU, Triton on GPU; warmed up before timing)")
    ap.add_argument("--long", action="store_true", help="long prompts (default lengths 4096 8192), one process per job")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="with --long: routes' memory budget (its default)")
    ap.add_argument("--child", choices=["forward", "route", "all"], help=argparse.SUPPRESS)
    ap.add_argument("--child-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.long:
        return long_prompts(args)

    from analyses import routes

    probe = build_probe(args)
    dev = probe.device
    print(f"model {probe.info.name}: {probe.info.n_layers} layers, {probe.info.n_heads} heads/{probe.info.n_kv_heads} kv, "
          f"d={probe.info.d_model}, {probe.info.dtype} on {dev}; torch threads {torch.get_num_threads()}")
    cfg = routes.Config(chunk_mb=args.chunk_mb, max_memory_gb=64, kernel=args.kernel)
    print(f"proximity kernel: {args.kernel}; load average {_load()} at the start")
    top_cfg = cfg.replace(mode="route")
    print("wall seconds (best of --repeat, forward / all positions / top-down taking turns); ratios in wall and in "
          "process CPU time")
    print(f"{'T':>6} {'forward s':>10} {'all-pos s':>10} {'ratio':>7} {'cpu ratio':>9} {'top-down s':>11} {'ratio':>7} "
          f"{'cpu ratio':>9} {'graph+route s':>14} {'peak MB':>9}")
    for T in args.lengths:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(4, min(probe.info.d_vocab, 30000), (1, T), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = None

        def go():
            nonlocal res
            res = routes.run(probe, ids, config=cfg)

        go()  # warm-up: compiles the kernel for this shape
        routes.run(probe, ids, config=top_cfg)
        b = interleaved({"forward": lambda: probe.forward(ids), "all": go,
                         "top": lambda: routes.run(probe, ids, config=top_cfg)}, dev, args.repeat)
        (t_fwd, c_fwd), (t_routes, c_routes), (t_top, c_top) = b["forward"], b["all"], b["top"]
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        r = res.route()
        t_graph = time.perf_counter() - t0
        print(f"{T:>6} {t_fwd:>10.3f} {t_routes:>10.3f} {t_routes / t_fwd:>7.2f} {c_routes / c_fwd:>9.2f} {t_top:>11.3f} "
              f"{t_top / t_fwd:>7.2f} {c_top / c_fwd:>9.2f} {t_graph:>14.3f} {peak:>9.0f}   "
              f"(route: {r.number_of_nodes()} nodes, {r.number_of_edges()} edges)", flush=True)
    print(f"load average {_load()} at the end (other jobs on the machine inflate both sides of each ratio unevenly)")


if __name__ == "__main__":
    main()
