"""Shared benchmark helpers: timing against a baseline in the same run, peak memory, GPU-shaped models."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Callable

import torch

GPU_SHAPES = {
    # random weights of real shapes (weights cannot travel to the GPU machine)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu-shape", default=None, choices=sorted(GPU_SHAPES), help="random-weight model of this shape")
    p.add_argument("--repeats", type=int, default=3)
    return p


def load_probe(args, backend: str = "nnsight"):
    from probes import from_hf, load_model

    if args.gpu_shape:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from probes.loading import embedded_model_dir

        torch.manual_seed(0)
        cfg = LlamaConfig(**GPU_SHAPES[args.gpu_shape])
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
        return from_hf(model, tok, backend=backend, name=args.gpu_shape)
    return load_model("embedded", backend=backend, device=args.device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int, device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_mb(device, reset: bool = False) -> float:
    """Peak GPU memory (MiB) on CUDA, else the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats()
            return 0.0
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(name: str, seconds: float, base: float, mem: float | None = None) -> str:
    m = f"{mem:9.0f} MiB" if mem is not None else ""
    return f"{name:<44} {seconds * 1e3:10.1f} ms  {seconds / base:6.2f}x  {m}"
