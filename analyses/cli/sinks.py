"""``sonde run sinks``, ``sonde run dormant`` and ``sonde run bb-toy``.

``--engine local|ray`` turns ``sinks`` into a sharded, resumable dataset sweep (:mod:`analyses.cli.sweeps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import config_option
from .common import planned, save_result, input_file, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress_bar, saved
from .sweeps import (AddressOpt, EngineOpt, GpusOpt, ResumeOpt, RetriesOpt, ShardOpt, ThreadsOpt, WorkersOpt, run_sweep,
                     sweep_summary)

def _positions(text: str) -> tuple[int, ...]:
    from probes.errors import ConfigError

    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--positions {text!r} is not a comma-separated list of integers.", hint="E.g. --positions 0,1.") from None


def register(run_app: typer.Typer) -> None:
    @run_app.command("sinks")
    @model_options
    def sinks_cmd(
        model: str = ModelOpt,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One text (must reach T tokens)."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSONL/Parquet (field 'text'), text file or hf:NAME:SPLIT.", callback=input_file),
        domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Built-in domain: prose, code, arithmetic, random, repeat."),
        eps: float = config_option("sinks", "eps"),
        positions: str = config_option("sinks", "positions", help="Key positions k (0-indexed), e.g. 0,1."),
        T: int = config_option("sinks", "T", help="Sequence length (texts truncated; shorter ones skipped)."),
        n_samples: int = config_option("sinks", "n_samples", "--n-samples", "-n"),
        bos: str = config_option("sinks", "bos"),
        batch_size: int = config_option("sinks", "batch_size"),
        mlp_ablation: bool = config_option("sinks", "mlp_ablation", "--ablation/--no-ablation"),
        on_error: str = typer.Option("stop", "--on-error", help="Malformed input line: stop or skip."),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, out: Optional[Path] = OutOpt,
        as_json: bool = JsonOpt,
        engine: Optional[str] = EngineOpt, address: Optional[str] = AddressOpt, workers: Optional[int] = WorkersOpt,
        gpus_per_worker: float = GpusOpt, shard_size: int = ShardOpt, max_retries: int = RetriesOpt, resume: bool = ResumeOpt,
        threads: int = ThreadsOpt,
    ) -> None:
        """Attention-sink metric Sink_k^ε (Gu et al. 2024), value drains and residual peaks.

        --input takes JSONL, Parquet, a text file or hf:NAME[:CONFIG]:SPLIT[:FIELD] (streamed, online).
        """
        from analyses import sinks
        from analyses.core.io import iter_records
        from probes.errors import InputError

        cfg = sinks.Config(eps=eps, positions=_positions(positions), T=T, n_samples=n_samples, bos=bos,
                           batch_size=batch_size, mlp_ablation=mlp_ablation)
        if sum(x is not None for x in (prompt, input, domain)) > 1:
            raise InputError("give at most one of --prompt, --input or --domain.")
        if domain is not None:
            from analyses.core.domains import check_domains

            check_domains([domain])
        if engine is not None:
            from analyses.core import domains as _dom

            if input is not None:
                items = [r.text for r in iter_records(input, on_error=on_error, limit=n_samples)][:n_samples]
                src = str(input)
            elif prompt is not None:
                items, src = [prompt], "texts"
            else:
                src = domain or "prose"
                if src in _dom.TOKEN_DOMAINS:
                    raise InputError(f"--domain {src} is token-level; a sweep needs texts.",
                                     hint=f"Use a text domain ({', '.join(_dom.TEXT_DOMAINS)}) or --input FILE.")
                # the one-pass run's draw (the same texts for every engine), made on the engine's model
                items = lambda eng: eng.call(_dom.draw_texts, src, n=n_samples, T=cfg.T, seed=cfg.seed,  # noqa: E731
                                             prepend_bos=sinks.bos_flag(cfg.bos))
            res, report, path = run_sweep("sinks", items, cfg, engine=engine, address=address, workers=workers,
                                          gpus_per_worker=gpus_per_worker, shard_size=shard_size, max_retries=max_retries,
                                          resume=resume, model=model, backend=backend, device=device, dtype=dtype, out=out,
                                          source=src, threads=threads)
            saved(path, as_json, {**res.summary(), **sweep_summary(report)})
            return
        texts = [prompt] if prompt is not None else [r.text for r in iter_records(input, on_error=on_error)] if input else None
        from analyses.core.planner import retry_on_oom

        cfg = planned(cfg, model, device, dtype)  # before loading
        probe = load_probe(model, backend, device, dtype)

        from analyses.core.cluster import _threads

        def go(b: int):
            with progress_bar() as bar, _threads(threads):
                return sinks.run(probe, texts, domain=domain if texts is None else None, config=cfg.replace(batch_size=b), progress=bar)

        res = retry_on_oom(go, cfg.batch_size, what="the sink statistics")
        path = save_result(res, out)
        saved(path, as_json, res.summary())

    @run_app.command("dormant")
    @model_options
    def dormant_cmd(
        model: str = ModelOpt,
        domains: str = typer.Option("prose,code,arithmetic", "--domains", help="Comma-separated built-in domains."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSONL with 'text' and 'domain' fields (replaces --domains).", callback=input_file),
        theta: float = config_option("dormant", "theta"),
        sink_pos: int = config_option("dormant", "sink_pos"),
        heads: Optional[str] = config_option("dormant", "heads", help="Heads for the causal check, e.g. L5H3,L20H6."),
        max_heads: int = config_option("dormant", "max_heads"),
        intervention: str = config_option("dormant", "intervention"),
        T: int = config_option("dormant", "T"),
        n_samples: int = config_option("dormant", "n_samples", "--n-samples", "-n"),
        bos: str = config_option("dormant", "bos"),
        on_error: str = typer.Option("stop", "--on-error"),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, out: Optional[Path] = OutOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Active vs dormant heads per domain (Guo et al. 2024), with a per-head causal check."""
        from analyses import dormant
        from analyses.core.domains import check_domains, load_jsonl

        cfg = dormant.Config(theta=theta, sink_pos=sink_pos, T=T, n_samples=n_samples, bos=bos, intervention=intervention,
                             heads=tuple(h.strip() for h in heads.split(",") if h.strip()) if heads else None, max_heads=max_heads)
        if input is not None:
            doms = load_jsonl(input, on_error=on_error)
        else:
            doms = [d.strip() for d in domains.split(",") if d.strip()]
            check_domains(doms)
        cfg = planned(cfg, model, device, dtype)
        probe = load_probe(model, backend, device, dtype)
        for lab in cfg.heads or ():  # before the statistics pass, not after it
            from probes import parse_head

            parse_head(lab, probe.info)
        with progress_bar() as bar:
            res = dormant.run(probe, doms, config=cfg, progress=bar)
        path = save_result(res, out)
        summ = res.summary()
        summ["flips"] = ", ".join(res.flips["head"].tolist()[:20]) or "none"
        saved(path, as_json, summ)

    @run_app.command("bb-toy")
    def bbtoy_cmd(
        layers: int = typer.Option(1, "--layers", help="1 or 3."),
        steps: int = typer.Option(400, "--steps"),
        attention: str = typer.Option("softmax", "--attention", help="softmax or relu."),
        optimizer: str = typer.Option("adam", "--optimizer", help="adam or sgd."),
        d_model: int = typer.Option(32, "--d-model"),
        seq_len: int = typer.Option(32, "--seq-len"),
        batch_size: int = typer.Option(32, "--batch-size"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        seed: int = typer.Option(0, "--seed"),
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Train the Bigram-Backcopy toy (Guo et al. 2024) on the CPU and log its sink dynamics."""
        from analyses import bbtoy

        cfg = bbtoy.Config(n_layers=layers, steps=steps, attention=attention, optimizer=optimizer, d_model=d_model,
                           seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed)
        cfg = planned(cfg, None, "cpu")
        with progress_bar() as bar:
            res = bbtoy.run(cfg, progress=bar)
        saved(save_result(res, out), as_json, res.summary())
