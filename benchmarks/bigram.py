"""Benchmark: one bigram-mask training step vs one ordinary fine-tuning step (same model, batch).

    python benchmarks/bigram.py                       # CPU, embedded model, block 0 masked, short rows
    python benchmarks/bigram.py --layers all --seq-len 64
    python benchmarks/bigram.py --device cuda --gpu-shape llama3-8b --layers 0,1 --batch 4 --seq-len 128

Prints seconds per step for: a plain forward, a fine-tuning step (AdamW over the same weights the
mask covers), a mask step (soft mask + soft-label CE + L0, AdamW over the mask logits), the ratio
mask/fine-tune (issue goal ≤ 1.5x), the mask state memory (logits + 2 Adam moments + grad) and peak
memory (CUDA) or RSS (CPU).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import bigram as B  # noqa: E402


def build_probe(args):
    from probes import from_hf, load_model

    if args.gpu_shape is None:
        return load_model(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    import transformers as T
    from transformers import AutoModelForCausalLM

    shapes = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)}
    cfg = T.LlamaConfig(**shapes[args.gpu_shape])
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    from probes import load_model as _lm  # tokenizer of the embedded model (ids are random anyway)

    tok = _lm("embedded", device="cpu").tokenizer
    return from_hf(model.eval(), tok, name=f"random-{args.gpu_shape}")


def timeit(fn, n):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=[None, "llama3-8b"])
    ap.add_argument("--layers", default="0", help="comma list or 'all'")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    probe = build_probe(args)
    model = probe.hf_model
    layers = None if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
    V = probe.info.d_vocab
    ids = torch.randint(0, min(V, 30000), (args.batch, args.seq_len), device=probe.device)
    table = B.BigramTable.from_ids(torch.randint(0, min(V, 30000), (200_000,)), V)
    target = table.targets(ids, device=probe.device)

    fwd = timeit(lambda: probe.forward(ids), args.repeats)

    # fine-tuning step over the same matrices the mask covers
    ws = B.masked_weights(probe, layers)
    from probes.arch import get_module

    params = [get_module(model, w.path).weight for w in ws]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: same arithmetic, weights unchanged

    def ft_step():
        opt.zero_grad(set_to_none=True)
        B.soft_cross_entropy(model(input_ids=ids, use_cache=False).logits, target).backward()
        opt.step()

    ft = timeit(ft_step, args.repeats)
    del opt
    for p in params:
        p.grad = None
        p.requires_grad_(False)

    masks = B.MaskSet(ws, device=probe.device)
    mopt = torch.optim.AdamW(masks.parameters(), lr=0.05)
    N = masks.n_params

    def mask_step():
        mopt.zero_grad(set_to_none=True)
        t = table.targets(ids, device=probe.device)  # per-batch dense target, as in training
        (B.soft_cross_entropy(model(input_ids=ids, use_cache=False).logits, t) + 10.0 / N * masks.l0()).backward()
        mopt.step()
        masks.beta *= 1.001

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with masks.applied(probe):
        ms = timeit(mask_step, args.repeats)
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    state_mb = N * 4 * 4 / 2**20  # logits + grad + exp_avg + exp_avg_sq (fp32)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {probe.info.name} on {probe.device}, layers={args.layers}, batch {args.batch} x {args.seq_len}, {N:,} mask params")
    print(f"forward            {fwd * 1e3:9.1f} ms")
    print(f"fine-tune step     {ft * 1e3:9.1f} ms  ({ft / fwd:.2f}x forward)")
    print(f"mask step          {ms * 1e3:9.1f} ms  ({ms / fwd:.2f}x forward, {ms / ft:.2f}x fine-tune; goal <= 1.5x)")
    print(f"mask state         {state_mb:9.1f} MiB   peak {'GPU' if torch.cuda.is_available() else 'RSS'} {peak:.0f} MiB")


if __name__ == "__main__":
    main()
