"""Benchmark: one counterfactual vs one vanilla sampled generation of the same length (same run, same model).

    .venv/bin/python benchmarks/counterfactual.py                       # embedded model, CPU, 20 tokens
    .venv/bin/python benchmarks/counterfactual.py --device cuda --gpu-shape llama3-8b --tokens 60

Prints median seconds and ratios against ``hf_model.generate(do_sample=True)``:
``factual`` (our Gumbel-Max decode loop), ``cf token edit`` (edit at the middle, KV prefix reused / recomputed),
``cf prompt edit``, ``cf model edit`` (factual + ablated rows in one batch), and peak memory.
Goal from the issue: a counterfactual <= 1.1x a vanilla generation.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _probe(args):
    from probes import from_hf, load_model

    if args.gpu_shape is None:
        return load_model(args.model, device=args.device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    shapes = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)}
    cfg = LlamaConfig(**{**shapes[args.gpu_shape], **({"num_hidden_layers": args.layers} if args.layers else {})})
    tok = load_model("embedded", device="cpu").tokenizer  # any tokenizer: ids beyond it are masked out
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return from_hf(model, tok, name=f"random-{args.gpu_shape}")


def _time(fn, repeats: int, device: str) -> float:
    ts = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-shape", default=None, choices=["llama3-8b"], help="random-weight model of this shape")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count of --gpu-shape")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from analyses import counterfactual as cf

    probe = _probe(args)
    prompt = "Once upon a time, Lyra lived in a small village by the sea. Every morning she"
    T = args.tokens
    cfg = cf.Config(max_new_tokens=T, temperature=0.8, seed=1, interventional=False, stop_at_eos=False)
    ids = probe.to_tokens(prompt)
    pad = probe.tokenizer.eos_token_id

    def vanilla():
        probe.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T, do_sample=True,
                                temperature=0.8, top_k=0, pad_token_id=pad)

    vanilla()  # warm-up
    t_van = _time(vanilla, args.repeats, args.device)
    t_fact = _time(lambda: cf.generate(probe, prompt, cfg), args.repeats, args.device)
    mid = T // 2

    def cf_only(spec, **kw):
        r = cf.run(probe, prompt, spec, config=cfg.replace(**kw))
        return r.timings

    def med(spec, key, **kw):
        return statistics.median(cf_only(spec, **kw).get(key, float("nan")) for _ in range(args.repeats))

    t_tok = med(f"token:{mid}=id:{int(ids[0, -1])}", "counterfactual")
    t_tok_nr = med(f"token:{mid}=id:{int(ids[0, -1])}", "counterfactual", prefix_reuse=False)
    t_prm = med("prompt:Lyra->Maeve", "counterfactual")
    t_mod = med("ablate:L1H0", "generate")
    t_post = med(f"token:{mid}=id:{int(ids[0, -1])}", "abduction", noise="posterior", n_samples=4)

    if args.device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"
    print(f"model {probe.info.name} ({probe.info.n_params / 1e6:.0f}M params) on {probe.info.device} {probe.info.dtype}, "
          f"prompt {ids.shape[1]} tokens, {T} new tokens, threads {torch.get_num_threads()}, median of {args.repeats}")
    rows = [("vanilla HF generate (sampled)", t_van), ("factual (Gumbel-Max loop)", t_fact),
            (f"cf token edit @ {mid}, KV prefix reused", t_tok), (f"cf token edit @ {mid}, prefix recomputed", t_tok_nr),
            ("cf prompt edit (common prefix reused)", t_prm), ("factual + cf model edit, one batch", t_mod),
            ("abduction, 4 posterior draws", t_post)]
    for name, t in rows:
        print(f"  {name:<42} {t * 1e3:9.1f} ms   {t / t_van:5.2f}x vanilla")
    print(f"  prefix reuse saves {100 * (1 - t_tok / t_tok_nr):.0f}% of a token-edit counterfactual; peak memory {peak}")


if __name__ == "__main__":
    main()
