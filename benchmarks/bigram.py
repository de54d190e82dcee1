"""Benchmark: one bigram-mask training step vs one ordinary fine-tuning step (same model, batch).

    python benchmarks/bigram.py                       # CPU, embedded model, all blocks, the paper's 32 x 128 batch
    python benchmarks/bigram.py --layers 0 --batch 1 --seq-len 32 --repeats 3   # a quick check
    python benchmarks/bigram.py --device cuda --gpu-shape llama3-8b --layers 0,1 --batch 4 --seq-len 128
    python benchmarks/bigram.py --long --out bigram-long   # a full mask search (see below)

Prints seconds per step, measured in the same run, for: a mask step as ``sonde run bigram`` takes it (soft mask,
the chunked soft-label CE against sparse bigram rows, micro-batches whose gradients add up to the batch, L0, AdamW
over the mask logits, no masked weight kept between a forward and its backward pass) and a plain fine-tuning step of
the same batch in the same passes (next-token CE, AdamW over the same matrices the mask covers); their ratio (goal
≤ 1.5x); and the peak memory of each phase (CPU: the whole process's peak RSS, read from VmHWM reset before the
phase; CUDA: peak allocated).

``--long`` trains one whole mask on the embedded model with the short-run schedule
(:func:`analyses.bigram.short_run_config`) and prints the curve, the held-out ablation table,
the sparsity over all block weights and the wall time; ``--out`` saves the result folder and
``--ship DIR`` writes the compact copy that :func:`analyses.bigram.default_result` loads.
"""

from __future__ import annotations

import argparse
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


def long_run(args) -> None:
    """One mask search on the embedded model, held-out evaluation, timings."""
    import json
    import platform

    torch.set_num_threads(args.threads)
    from probes import load_model

    probe = load_model(args.model, device=args.device)
    layers = None if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
    cfg = B.short_run_config(args.steps, lam=args.lam, lr=args.lr, final_beta=args.final_beta, batch=args.batch,
                             seq_len=args.seq_len, layers=layers, others=args.others, eval_rows=args.eval_rows)
    print(f"config: {json.dumps(cfg.to_dict(), default=str)}", flush=True)
    t0 = time.perf_counter()

    def cb(ev):  # analyses.core.progress.Progress events; one line per curve point while training
        if ev.phase == "training" and ev.done and (ev.done % cfg.log_every == 0 or ev.finished):
            print(f"{time.perf_counter() - t0:8.1f}s {ev}", flush=True)
        elif ev.phase != "training" and ev.done == 0:
            print(f"{time.perf_counter() - t0:8.1f}s {ev.phase}", flush=True)

    ck = (args.out.rstrip("/") + "-checkpoint") if args.out else None  # a crash after training resumes from here
    res = B.run(probe, "builtin", config=cfg, progress=cb, checkpoint=ck)
    wall = time.perf_counter() - t0
    print(res.ablation.to_string(), flush=True)
    ab = res.ablation.set_index("variant")
    print(f"sparsity (kept / all block weights) {res.sparsity:.4%}; steps {res.steps_done}; wall {wall:.0f} s "
          f"(train {res.timings.get('train', float('nan')):.0f} s, evaluate {res.timings.get('evaluate', float('nan')):.0f} s); "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    print(f"bigram CE (held out): subnetwork {ab.loc['subnetwork', 'bigram_xent_nats']:.3f}, full {ab.loc['full', 'bigram_xent_nats']:.3f}, "
          f"random same-size {ab.loc['random', 'bigram_xent_nats']:.3f}, bigram entropy {B.bigram_entropy_nats(res):.3f} nats", flush=True)
    print(res.per_layer().to_string(), flush=True)
    if args.out:
        print("saved", res.save(args.out), flush=True)
    if args.ship:
        print("shipped", B.ship_result(res, args.ship), flush=True)


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux), or 0."""
    import re

    try:
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def _reset_peak() -> None:
    """Reset VmHWM (the peak resident memory) to the current RSS (Linux; a no-op elsewhere)."""
    import gc

    gc.collect()
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    """GiB: the peak GPU memory allocated, or the peak RSS of the whole process since :func:`_reset_peak`."""
    return (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _rss("VmHWM")) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", action="store_true", help="train one whole mask (see the module docstring)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--lr", type=float, default=0.05, help="--long: AdamW learning rate of the mask logits")
    ap.add_argument("--final-beta", type=float, default=B.SHORT_FINAL_BETA, help="--long: β at the last step")
    ap.add_argument("--others", default="drop", choices=["keep", "drop"])
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ship", default=None)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=[None, "llama3-8b"])
    ap.add_argument("--layers", default="all", help="comma list or 'all' (default: all, as `sonde run bigram`)")
    ap.add_argument("--batch", type=int, default=32, help="rows per optimizer step (default: the paper's 32)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row (default: the paper's 128)")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps of each kind, after one untimed warm-up step")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="rows per forward/backward pass of both steps (default: as `sonde run bigram` plans it on a CPU, "
                         "512 tokens per pass)")
    args = ap.parse_args()
    if args.long:
        return long_run(args)
    torch.set_num_threads(args.threads)
    probe = build_probe(args)
    model = probe.hf_model
    layers = None if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
    V = probe.info.d_vocab
    ids = torch.randint(0, min(V, 30000), (args.batch, args.seq_len), device=probe.device)
    table = B.BigramTable.from_ids(torch.randint(0, min(V, 30000), (200_000,)), V)
    mb = args.micro_batch or max(1, 512 // args.seq_len)
    loaded = _rss("VmRSS") / 2**30
    ws = B.masked_weights(probe, layers)

    # the mask step first, so that its peak is not the fine-tuning step's (AdamW over the weights holds 2 more copies)
    masks = B.MaskSet(ws, device=probe.device)
    mopt = torch.optim.AdamW(masks.parameters(), lr=0.05)
    N = masks.n_params

    def mask_step():  # as train_mask: sparse bigram rows, the chunked loss, micro-batches adding up to the batch
        mopt.zero_grad(set_to_none=True)
        for lo in range(0, args.batch, mb):
            part = ids[lo: lo + mb]
            B.mask_pass(probe, masks, part, table.rows(part, device=probe.device), part.shape[0] / args.batch)
        masks.add_l0_grad(10.0 / N)
        mopt.step()
        masks.beta *= 1.001

    _reset_peak()
    with probe.frozen_weights(), masks.applied(probe), masks.recompute_masked(probe):
        ms = timeit(mask_step, args.repeats)
    mask_peak = _peak()
    del masks, mopt

    # a plain fine-tuning step of the same batch in the same passes: next-token CE, AdamW over the masked matrices
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
        for lo in range(0, args.batch, mb):
            part = ids[lo: lo + mb]
            (model(input_ids=part, labels=part, use_cache=False).loss * (part.shape[0] / args.batch)).backward()
        opt.step()

    _reset_peak()
    ft = timeit(ft_step, args.repeats)
    ft_peak = _peak()
    del opt
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(flags[id(p)])
    state_gib = N * 4 * 4 / 2**30  # logits + grad + exp_avg + exp_avg_sq (fp32)
    where = "GPU allocated" if torch.cuda.is_available() else "RSS of the whole process"
    print(f"model {probe.info.name} on {probe.device}, layers={args.layers}, batch {args.batch} x {args.seq_len} "
          f"in passes of {mb} rows, {N:,} mask params, {torch.get_num_threads()} threads; loaded model: RSS {loaded:.2f} GiB")
    print(f"fine-tune step     {ft:9.1f} s   peak {where} {ft_peak:.2f} GiB")
    print(f"mask step          {ms:9.1f} s   peak {where} {mask_peak:.2f} GiB (goal <= 4 GB; mask state {state_gib:.2f} GiB)")
    print(f"mask / fine-tune   {ms / ft:9.2f}x  (goal <= 1.5x)")


if __name__ == "__main__":
    main()
