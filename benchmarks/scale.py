"""Benchmark: dataset-sweep throughput on Ray (1 and 2 workers) vs one process, and the merge overhead.

    .venv/bin/python benchmarks/scale.py                                  # CPU laptop: 1 and 2 local workers
    .venv/bin/python benchmarks/scale.py --device cuda --gpus-per-worker 1 --workers 1,2   # one worker per GPU

All runs measure the sink statistics (``analyses.sinks``, no MLP ablation) of the same built-in corpus
(prose + code texts) with the same shards: (a) ``sinks.run`` in this process, (b) the local engine
(same shards, one process), (c) Ray with N workers. It prints samples/s, the ratio to (a), the merge
time (folding shard states into the ledger plus finishing the result) as a share of the sweep, the
worker start-up time (model load per worker, paid once per sweep), and checks that every sweep equals
(b) exactly. On a CPU box each Ray worker runs torch with one thread (Ray sets OMP_NUM_THREADS from
its CPUs) while (a) uses every core, so speed-ups need more cores than workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32, help="texts in the corpus (half prose, half code)")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of this process (Ray workers use 1 per CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import ray

    from analyses.core import cluster, domains
    from analyses import sinks
    from probes import load_model

    texts = domains.domain_texts("prose", n=args.samples // 2) + domains.domain_texts("code", n=args.samples - args.samples // 2)
    cfg = sinks.Config(n_samples=len(texts), batch_size=args.batch_size, mlp_ablation=False)
    scfg = cluster.SweepConfig(shard_size=args.shard_size)
    probe = load_model(args.model, device=args.device)
    print(f"model {args.model} on {args.device}; {len(texts)} texts, T={cfg.T}, batch {cfg.batch_size}, "
          f"shards of {args.shard_size} ({len(cluster.plan_shards(len(texts), args.shard_size))} shards); torch threads {torch.get_num_threads()}")

    sinks.run(probe, texts[: args.batch_size], config=cfg.replace(n_samples=args.batch_size))  # warm-up
    t = time.perf_counter()
    single = sinks.run(probe, texts, config=cfg)
    t_single = time.perf_counter() - t
    n = single.n_samples
    rows = [("single process (sinks.run)", t_single, None, None)]

    t = time.perf_counter()
    local = cluster.sweep("sinks", texts, config=cfg, engine=cluster.LocalEngine(probe), sweep_config=scfg)
    t_local = time.perf_counter() - t
    rows.append(("local engine (same shards)", t_local, local.report.seconds["merge"] + local.report.seconds["finish"], None))

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    exact = True
    for w in [int(x) for x in args.workers.split(",") if x.strip()]:
        rc = scfg.replace(engine="ray", workers=w, gpus_per_worker=args.gpus_per_worker)
        t = time.perf_counter()
        eng = cluster.RayEngine(cluster.ModelSpec(args.model, device="auto" if args.gpus_per_worker else args.device), rc)
        t_start = time.perf_counter() - t
        cluster.sweep("sinks", texts[: w * args.batch_size], config=cfg.replace(n_samples=w * args.batch_size), engine=eng,
                      sweep_config=rc.replace(shard_size=args.batch_size))  # warm-up every worker
        t = time.perf_counter()
        run = cluster.sweep("sinks", texts, config=cfg, engine=eng, sweep_config=rc)
        t_run = time.perf_counter() - t
        eng.close()
        for k in ("alpha_mean", "exceed", "value_norm", "resid_norm"):
            exact &= torch.equal(getattr(run.result, k), getattr(local.result, k))
        rows.append((f"ray, {w} worker{'s' if w > 1 else ''}", t_run, run.report.seconds["merge"] + run.report.seconds["finish"], t_start))
    ray.shutdown()

    print(f"\n{'run':30s} {'seconds':>8s} {'samples/s':>10s} {'vs single':>10s} {'merge+finish':>13s} {'worker start':>13s}")
    for name, sec, merge, start in rows:
        print(f"{name:30s} {sec:8.2f} {n / sec:10.2f} {t_single / sec:9.2f}x "
              f"{'' if merge is None else f'{merge:.3f}s ({100 * merge / sec:.1f}%)':>13s} {'' if start is None else f'{start:.1f}s':>13s}")
    print(f"\nevery sweep equals the local engine exactly: {exact}")


if __name__ == "__main__":
    main()
