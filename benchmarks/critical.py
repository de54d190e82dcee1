"""Benchmark: critical-token rollouts vs plain batched ``generate``.

Prints, measured in the same run on the same model, batch and lengths:

* rollout tokens/s of :func:`analyses.critical.rollout_success` (shared prefix KV cache, answer
  stopping off so lengths match) as a ratio of plain ``hf_model.generate`` tokens/s (goal >= 0.8x);
* the prefix-reuse speed-up: per-position rollouts with the prefix cache vs without;
* peak memory (CUDA: max allocated; CPU: max RSS).

    python benchmarks/critical.py                      # CPU, embedded model, small sizes
    python benchmarks/critical.py --device cuda --gpu-shape llama3-8b --batch 64 --prompt-len 512 --new 128
"""

from __future__ import annotations

import argparse
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


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=[None, "llama3-8b"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--positions", type=int, default=3, help="prefix positions for the reuse comparison")
    ap.add_argument("--vllm", action="store_true", help="also time rollouts through vLLM (CUDA, `pip install vllm`)")
    args = ap.parse_args()

    from analyses import critical as C

    probe = build(args)
    dev = probe.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(probe.info.d_vocab, 30000), (args.prompt_len,), generator=g).tolist()
    prompt, resp = ids[: args.prompt_len // 2], ids[args.prompt_len // 2:]
    cfg = C.Config(n_rollouts=args.batch, batch_size=args.batch, max_new_tokens=args.new, stop_at_answer=False, temperature=1.0)
    never_eos = lambda t: False  # noqa: E731
    eos = sorted(C._eos_ids(probe))

    def plain():
        x = torch.tensor([ids], device=dev).expand(args.batch, -1)
        return probe.hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                                       max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=eos[0] if eos else 0)

    def roll(pc):
        return lambda: C.rollout_success(probe, prompt, resp, len(resp), never_eos, args.batch, cfg.replace(prefix_cache=pc))

    timed(plain, sync)  # warm-up
    t_plain, out = timed(plain, sync)
    n_plain = (out.shape[1] - len(ids)) * args.batch
    t_roll, _ = timed(roll(True), sync)
    n_roll = args.new * args.batch  # random ids rarely hit EOS; count the cap (as min_new_tokens forces for plain)
    # per-position rollouts: with vs without the shared prefix cache
    pos = [len(resp) * (i + 1) // (args.positions + 1) for i in range(args.positions)]
    t_cache = sum(timed(lambda k=k: C.rollout_success(probe, prompt, resp, k, never_eos, args.batch, cfg), sync)[0] for k in pos)
    t_nocache = sum(timed(lambda k=k: C.rollout_success(probe, prompt, resp, k, never_eos, args.batch, cfg.replace(prefix_cache=False)), sync)[0] for k in pos)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {probe.info.name} on {dev}, batch {args.batch}, prompt {len(ids)} tokens, {args.new} new tokens")
    print(f"plain generate     : {n_plain / t_plain:8.1f} tok/s ({t_plain:.2f} s)")
    print(f"rollouts (cached)  : {n_roll / t_roll:8.1f} tok/s ({t_roll:.2f} s)  ratio {t_plain / t_roll * n_roll / n_plain:.2f}x (goal >= 0.8x)")
    print(f"{args.positions} positions      : cached {t_cache:.2f} s vs uncached {t_nocache:.2f} s  -> prefix reuse {t_nocache / t_cache:.2f}x")
    if args.vllm:
        vcfg = cfg.replace(engine="vllm")
        C.rollout_success(probe, prompt, resp, len(resp), never_eos, args.batch, vcfg)  # engine start + warm-up
        t_v, _ = timed(lambda: C.rollout_success(probe, prompt, resp, len(resp), never_eos, args.batch, vcfg), sync)
        print(f"rollouts (vLLM)    : {n_roll / t_v:8.1f} tok/s ({t_v:.2f} s)  ratio {t_plain / t_v * n_roll / n_plain:.2f}x vs plain generate")
    print(f"peak memory        : {peak:.0f} MiB ({'CUDA allocated' if dev.type == 'cuda' else 'max RSS'})")


if __name__ == "__main__":
    main()
