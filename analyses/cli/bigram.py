"""``sonde run bigram`` (learn a bigram subnetwork) and ``sonde run bigram-eval`` (re-evaluate a saved mask)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import planned, save_result, data_file, folder_path, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, echo_json, load_probe, progress_bar, saved, status

__all__ = ["register"]


def _layers(spec: Optional[str]):
    from probes import ConfigError

    if spec is None or spec.strip() == "all":
        return None
    try:
        out = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--layers {spec!r} is not a comma-separated list of block indices.", hint="E.g. --layers 0,1 or --layers all.") from None
    if not out:
        raise ConfigError(f"--layers {spec!r} names no block.", hint="E.g. --layers 0,1, or leave --layers out for all.")
    return out


def _ablation_lines(df) -> list[str]:
    return [f"{r.variant:>18}: kept={r.kept_fraction:.4%} surprisal={r.mean_surprisal_bits:.3f} bits "
            f"bigram_xent={r.bigram_xent_nats:.3f} nats r={r.pearson_r:.3f}" for r in df.itertuples()]


def register(run_app: typer.Typer) -> None:
    @run_app.command("bigram")
    @model_options
    def bigram_cmd(
        model: str = ModelOpt,
        corpus: str = typer.Option("builtin", "--corpus", "-c", help="'builtin' (Python's pydoc topics, offline), a UTF-8 .txt or a .jsonl (field 'text').",
                                    callback=data_file("corpus file", keep=("builtin",))),
        schedule: str = typer.Option("paper", "--schedule", help="paper: λ 10, lr 5e-5, β ×1.001 per step, 15000 steps. short: a few hundred "
                                     "steps that still end binary: λ 100, lr 0.05, β ×1000^(1/steps) (reaches 1000 at the last step), "
                                     "250 steps, --reuse. Options given explicitly override either."),
        lam: Optional[float] = typer.Option(None, "--lambda", help="Sparsity weight λ ≥ 0, normalised per mask entry (paper 10, 100 for ~1B models; "
                                            "short runs need ~100 to beat minibatch noise; inf = keep nothing)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (paper 5e-5; short 0.05)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Maximum optimizer steps (paper 15000; short 250)."),
        batch: int = typer.Option(32, "--batch-size", help="Rows per micro-batch (paper 32)."),
        seq_len: int = typer.Option(128, "--seq-len", help="Tokens per row (paper 128)."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="Rows per forward/backward pass (default: planned, "
                                                  "the largest that fits the free memory, on a CPU at most 512 tokens). Gradients of the passes add up, "
                                                  "so the result does not depend on it; only the peak memory does."),
        temp_mult: Optional[float] = typer.Option(None, "--temp-mult", help="β multiplier per step (paper 1.001; short: 1000^(1/steps), e.g. 1.028 "
                                                  "for 250 steps). With 1.001 a 250-step run ends at β≈1.3 and leaves almost every mask entry undecided."),
        final_beta: Optional[float] = typer.Option(None, "--final-beta", help="β at the last step: sets --temp-mult to final_beta^(1/steps) "
                                                   "(short default 1000; a gentler 300 with --lr 0.01 over 400–800 steps gives a sharper, better mask, "
                                                   "see the README)."),
        layers_drop: bool = typer.Option(False, "--drop-other-layers", help="With --layers: blocks outside them are left out of the subnetwork "
                                         "(mask 0) and skipped in training — much faster; exact for bias-free blocks (Llama family)."),
        target: str = typer.Option("bigram", "--target", help="bigram, or self (optimal pruning: distil the full model)."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Blocks to mask, e.g. 0,1 (default: all)."),
        eval_rows: int = typer.Option(10000, "--eval-rows", help="Held-out rows for evaluation (≤10 % of the corpus)."),
        reuse: Optional[bool] = typer.Option(None, "--reuse/--no-reuse", help="Cycle through a corpus smaller than steps × batch (paper: never; short: on)."),
        seed: int = typer.Option(0, "--seed"),
        no_eval: bool = typer.Option(False, "--no-eval", help="Skip the ablation table."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder for resumable state (default: a private folder in the per-user cache, removed after success).",
                                                   callback=folder_path),
        out: Optional[Path] = OutOpt,
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Bigram subnetwork (Chang & Bergen 2025): learn the sparse mask of block weights that predicts bigrams.

        A killed run resumes from its checkpoint when the same command is run again.
        """
        import shutil

        from analyses.core import store
        from analyses import bigram
        from analyses.core.io import work_dir

        from probes import ConfigError

        if schedule not in ("paper", "short"):
            raise ConfigError(f"--schedule {schedule!r} is not known.", hint="Use paper or short.")
        if layers_drop and _layers(layers) is None:
            raise ConfigError("--drop-other-layers leaves out the blocks outside --layers, but --layers names none (all blocks).",
                              hint="Add --layers, e.g. --layers 0,1, or drop --drop-other-layers.")
        if final_beta is not None and temp_mult is not None:
            raise ConfigError("--final-beta and --temp-mult both set the temperature schedule.", hint="Give one of them.")
        n_steps = steps if steps is not None else (250 if schedule == "short" else 15000)
        if final_beta is not None:
            try:
                temp_mult = bigram.temp_mult_for(final_beta, n_steps)
            except ConfigError as e:
                raise ConfigError(f"--final-beta {final_beta!r}; it must be ≥ 1.", hint=e.hint) from None
        given = {k: v for k, v in dict(lam=lam, lr=lr, temp_mult=temp_mult, reuse=reuse).items() if v is not None}
        rest = dict(batch=batch, seq_len=seq_len, grad_accum=grad_accum, target=target, layers=_layers(layers),
                    others="drop" if layers_drop else "keep", eval_rows=eval_rows, seed=seed)
        if schedule == "short":
            cfg = bigram.short_run_config(n_steps, **rest).replace(**given)
        else:
            cfg = bigram.Config(steps=n_steps, **rest, **given)
        cfg, plan = planned(cfg, model, device, dtype, max_batch=micro_batch, with_plan=True)  # before loading
        mb = plan.batch_size if plan is not None else micro_batch
        probe = load_probe(model, backend, device, dtype)
        run_fp = store.hash_inputs(probe.info.fingerprint, cfg.to_dict(), corpus)
        ck = checkpoint or work_dir(out if out is not None else store.results_root(), f"bigram-{run_fp}")
        with progress_bar() as bar:
            res = bigram.run(probe, corpus, config=cfg, evaluate=not no_eval, checkpoint=ck, progress=bar, micro_batch=mb)
        path = save_result(res, out)
        if checkpoint is None:
            shutil.rmtree(ck, ignore_errors=True)
        summary = {"sparsity": f"{res.sparsity:.4%}", "steps": res.steps_done, "stopped_early": res.stopped_early,
                   "top_layer": int(res.per_layer().sort_values("fraction").iloc[-1]["layer"]) if len(res.matrices) else None}
        if as_json:
            summary["ablation"] = res.ablation.to_dict(orient="records")
        else:
            for line in _ablation_lines(res.ablation):
                typer.echo(line)
        saved(path, as_json, summary)

    @run_app.command("bigram-eval")

    @model_options
    def bigram_eval_cmd(
        mask: Path = typer.Option(..., "--mask", help="Folder of a saved `sonde run bigram` result, or 'shipped' (the mask shipped with Sonde)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: the one the mask was trained on)."),
        corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="Evaluation corpus (default: the training corpus's held-out rows).",
                                              callback=data_file("corpus file", keep=("builtin",))),
        eval_rows: Optional[int] = typer.Option(None, "--eval-rows", help="Held-out rows to evaluate."),
        compare: Optional[Path] = typer.Option(None, "--compare", help="Another mask folder (or 'shipped'): report the overlap."),
        batch: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Held-out rows per forward pass (default 8; lowered by "
                                            "the planner to fit the free memory; the numbers do not depend on it)."),
        out: Optional[Path] = OutOpt,
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Ablation table (full / subnetwork / random / complement / random complement) and sparsity of a saved mask."""
        from analyses import bigram
        from probes import InputError

        with status("Reading mask"):
            res = bigram.BigramResult.load(mask)
        name = model or res.model.get("source") or res.model.get("name", "embedded")
        cfg = res.config if eval_rows is None else res.config.replace(eval_rows=eval_rows)
        _, plan = planned(cfg, name, device, dtype, verb="bigram-eval", batch_size=batch, with_plan=True)  # before loading
        probe = load_probe(name, backend, device, dtype)
        if probe.info.fingerprint != res.model.get("fingerprint"):
            names = {w.path: w.shape for w in bigram.masked_weights(probe)}
            if any(names.get(k) != tuple(v.shape) for k, v in res.masks.items()):
                raise InputError(f"the mask in {str(mask)!r} was trained on {res.model.get('name')!r} and does not fit {probe.info.name!r}.",
                                 hint="Pass --model with the model the mask was trained on.")
        with progress_bar() as bar:
            ev = bigram.evaluate(probe, res, corpus, compare=compare, eval_rows=eval_rows, progress=bar,
                                 batch=plan.batch_size if plan is not None else (batch or bigram.EVAL_BATCH))
        summary = {"sparsity": f"{ev.sparsity:.4%}", "ablation": ev.ablation.to_dict(orient="records")}
        if "compare" in ev.overlaps:
            summary["overlap"] = ev.overlaps["compare"]
        if out is not None:
            path = save_result(ev, out)
            summary["result"] = str(path)
        if as_json:
            echo_json(summary)
            return
        typer.echo(f"sparsity: {summary['sparsity']}")
        for line in _ablation_lines(ev.ablation):
            typer.echo(line)
        if "overlap" in summary:
            o = summary["overlap"]
            typer.echo(f"overlap: jaccard={o['jaccard']:.4f} a_in_b={o['frac_a_in_b']:.4f} ratio_to_random={o['ratio_to_random']:.2f}")
        if out is not None:
            typer.echo(f"saved {summary['result']}")
