"""Benchmark: Sonde's rollout engine vs plain batched ``generate`` over the same shared prefix cache.

Prints, measured in the same run on the same model, batch and lengths:

* rollout tokens/s of :func:`probes.generation.sample` (the engine of :mod:`analyses.critical`: the prefix's KV
  cache computed once and copied into the batch, one batched decode loop, a seeded stream per row) as a ratio of
  plain ``hf_model.generate`` tokens/s on the same batch, its cache built the same way (the prefix run once, the
  cache repeated along the batch and passed as ``past_key_values``), goal >= 0.8x. EOS is off on both sides
  (``eos=()`` / ``min_new_tokens``), so both generate exactly ``batch x new`` tokens;
* the engine without the prefix cache (the prefix run again for every row) for the prefix-reuse speed-up;
* peak memory of each (CUDA: max allocated; CPU: peak resident memory above the loaded model, VmHWM after a
  clear_refs reset on Linux, else max RSS).

    python benchmarks/critical.py                      # CPU, embedded model, small sizes
    python benchmarks/critical.py --device cuda --gpu-shape llama3-8b --batch 64 --prompt-len 512 --new 128
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import resource
import time

import torch


def build(args):
    from probes import from_hf, load_model

    if args.gpu_shape is None:
        return load_model(args.model, device=args.device)
    import transformers as T

    shapes = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)}
    cfg = T.LlamaConfig(**shapes[args.gpu_shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(args.device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    tok = load_model("embedded", device="cpu").tokenizer  # any tokenizer: ids only need to be valid
    return from_hf(model, tok, name=f"random-{args.gpu_shape}")


def _rss(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def measured(fn, dev):
    """``(seconds, peak bytes, result)`` of ``fn()``."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif os.path.exists("/proc/self/clear_refs"):
        base = _rss("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif os.path.exists("/proc/self/clear_refs"):
        peak = _rss("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dt, peak, out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=[None, "llama3-8b"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (the best counts)")
    args = ap.parse_args()

    from transformers import DynamicCache

    probe = build(args)
    dev, model, B, N = probe.device, probe.hf_model, args.batch, args.new
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(probe.info.d_vocab, 30000), (args.prompt_len,), generator=g).tolist()
    x = torch.tensor([ids], device=dev)
    pad = probe.tokenizer.pad_token_id or 0

    def plain():  # transformers' generate over the same shared prefix cache: prefix once, cache repeated B times
        base = DynamicCache(config=model.config)
        model(input_ids=x[:, :-1], past_key_values=base, use_cache=True)
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(B)
        xb = x.expand(B, -1)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(0)
            return model.generate(input_ids=xb, attention_mask=torch.ones_like(xb), past_key_values=cache, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad)

    def engine(prefix_cache=True):
        return lambda: probe.sample(ids, B, max_new_tokens=N, temperature=1.0, seed=0, batch_size=B, eos=(), prefix_cache=prefix_cache)

    plain(), engine()()  # warm-up
    runs = {"plain": [], "engine": [], "engine_nocache": []}
    for _ in range(args.repeats):  # interleaved, so a change of load hits all alike
        runs["plain"].append(measured(plain, dev))
        runs["engine"].append(measured(engine(), dev))
        runs["engine_nocache"].append(measured(engine(False), dev))
    n_plain = (runs["plain"][0][2].shape[1] - len(ids)) * B
    n_eng = sum(len(r) for r in runs["engine"][0][2])
    assert n_plain == n_eng == B * N, (n_plain, n_eng)
    best = {k: min(r[0] for r in v) for k, v in runs.items()}
    peak = {k: max(r[1] for r in v) for k, v in runs.items()}
    what = "CUDA allocated" if dev.type == "cuda" else "peak RSS above the model"
    print(f"model {probe.info.name} on {dev} ({torch.get_num_threads()} threads), batch {B}, prompt {len(ids)} tokens, "
          f"{N} new tokens per row, best of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print(f"plain generate, shared cache : {B * N / best['plain']:8.1f} tok/s ({best['plain']:.2f} s), peak {peak['plain'] / 2**20:.0f} MiB ({what})")
    print(f"rollout engine               : {B * N / best['engine']:8.1f} tok/s ({best['engine']:.2f} s), peak {peak['engine'] / 2**20:.0f} MiB"
          f"  ratio {best['plain'] / best['engine']:.2f}x (goal >= 0.8x)")
    print(f"engine without prefix cache  : {B * N / best['engine_nocache']:8.1f} tok/s ({best['engine_nocache']:.2f} s)"
          f"  -> prefix reuse {best['engine_nocache'] / best['engine']:.2f}x")


if __name__ == "__main__":
    main()
