"""The options and driver shared by the verbs that run as sharded, resumable dataset sweeps
(``sonde run sinks --engine``, ``sonde run routes --input ... --engine``; :mod:`analyses.core.cluster`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import save_result, load_probe, progress_bar, status

__all__ = ["EngineOpt", "AddressOpt", "WorkersOpt", "GpusOpt", "ShardOpt", "RetriesOpt", "ResumeOpt", "ThreadsOpt",
           "run_sweep", "sweep_summary"]

EngineOpt = typer.Option(None, "--engine", help="Sharded dataset sweep: local (this process) or ray. Default: one pass, no shards.")
AddressOpt = typer.Option(None, "--address", help="Ray cluster to join ('auto', 'ray://head:10001'); default: start Ray here.")
WorkersOpt = typer.Option(None, "--workers", help="Ray workers (default: one per GPU with --gpus-per-worker, else 2).")
GpusOpt = typer.Option(0.0, "--gpus-per-worker", help="GPUs per Ray worker (1 = one model per GPU).")
ShardOpt = typer.Option(32, "--shard-size", help="Items per shard (a multiple of --batch-size keeps one-pass batches).")
RetriesOpt = typer.Option(2, "--max-retries", help="Extra attempts of a failing shard.")
ResumeOpt = typer.Option(True, "--resume/--no-resume", help="Resume from the shards of an interrupted sweep (merge ledger).")
ThreadsOpt = typer.Option(1, "--threads", min=1, max=256, help="Torch CPU threads of the statistics, the same in every engine and the "
                          "one-pass run (so they agree bit for bit); more is faster on a many-core CPU.")


def _model_spec(model: str, backend: str, device: str, dtype: str):
    """The worker's model: the verb's model options, including the ``@model_options`` ones (revision, device map...)."""
    from analyses.core import cluster

    from .common import _SCALE

    opts = _SCALE.get()
    return cluster.ModelSpec(model, backend, device, dtype, revision=opts.get("revision"), device_map=opts.get("device_map"),
                             max_memory=opts.get("max_memory"), remote=bool(opts.get("remote", False)))


def run_sweep(analysis: str, items, config, *, engine: str, address, workers, gpus_per_worker: float, shard_size: int,
              max_retries: int, resume: bool, model: str, backend: str, device: str, dtype: str, out,
              source: str, threads: int | None = 1):
    """Run a sweep, save the result (+ ``sweep.json``) and drop the merge ledger; returns ``(result, report, path)``.

    Options and input are checked before any worker (or Ray) starts. ``items`` is the list of items, or a function
    ``items(engine)`` that draws them once the engine holds the model (a sampled corpus: the texts depend on the
    tokenizer). The result's key is the analysis's own (derived from the items it measured); the merge ledger is
    named by what the sweep was given, so a re-run of the same command resumes.
    """
    from analyses.core import cluster
    from analyses.core.store import hash_inputs, results_root

    scfg = cluster.SweepConfig(engine=engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                               shard_size=shard_size, max_retries=max_retries, resume=resume, threads=threads)
    spec = _model_spec(model, backend, device, dtype)
    if not callable(items):
        cluster.plan_shards(len(items), shard_size)  # an empty input is refused before any worker starts
    if engine == "ray":
        cluster.check_ray_model(spec, scfg)
        cluster._ray()
    if engine == "local":
        eng = cluster.LocalEngine(load_probe(model, backend, device, dtype), max_retries=max_retries)
    else:
        with status(f"Starting Ray workers ({model})"):
            eng = cluster.RayEngine(spec, scfg)
    try:
        if callable(items):
            items = items(eng)
            cluster.plan_shards(len(items), shard_size)
        given = hash_inputs(analysis, eng.info["fingerprint"], config.to_dict(), cluster.hash_items(items))
        ledger = cluster.default_ledger(Path(out) if out is not None else results_root() / f"sweep-{given}")
        with progress_bar() as bar:
            run = cluster.sweep(analysis, items, config=config, engine=eng, sweep_config=scfg, ledger=ledger,
                                source=source, progress=bar)
    finally:
        eng.close()
    path = save_result(run.result, Path(out) if out is not None else None)
    run.report.save(path)
    import shutil

    shutil.rmtree(ledger, ignore_errors=True)
    return run.result, run.report, path


def sweep_summary(report) -> dict:
    return {"engine": report.engine, "workers": report.workers, "shards": report.n_shards,
            "shards resumed": report.shards_resumed,
            "retried shards": ", ".join(f"{k} ({v} attempts)" for k, v in sorted(report.retried.items())) or "none"}


