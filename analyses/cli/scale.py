"""``sonde run plan`` (memory planner) and ``sonde run sweep`` (one analysis across checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import (progress_bar, report_saved, BackendOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxMemoryOpt, OutOpt, echo_json, input_file,
                     non_empty_list, saved, status)



def _settings(pairs: List[str]) -> dict:
    """``["T=32", "eps=0.2", "positions=[0,1]"]`` -> ``{"T": 32, "eps": 0.2, "positions": [0, 1]}`` (values read as JSON)."""
    from probes.errors import ConfigError

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--set {p!r} is not KEY=VALUE.", hint="E.g. --set T=32 --set n_samples=16.")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def register(run_app: typer.Typer) -> None:
    @run_app.command("plan")
    def plan_cmd(
        analysis: str = typer.Argument(..., help="An analysis verb (sinks, routes, bigram, critical, ...), forward or generate."),
        model: str = typer.Option("embedded", "--model", "-m", help="'embedded', an HF id (local cache) or a local folder."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", "--T", help="Tokens per row (default: the analysis's own default, else 64)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="The batch you want (the plan never exceeds it)."),
        device: str = DeviceOpt, dtype: str = DtypeOpt,
        chunk_mb: int = typer.Option(256, "--chunk-mb", min=1, help="routes: the proximity-chunk budget to start from."),
        new_tokens: Optional[int] = typer.Option(None, "--new-tokens", min=0, help="critical/counterfactual: tokens generated per rollout "
                                                 "(default: the analysis's own default)."),
        free: Optional[str] = typer.Option(None, "--free", help="Plan for this much free memory (e.g. 24GiB) instead of reading the device."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Revision of a hub id."),
        as_json: bool = JsonOpt,
    ) -> None:
        """Estimate peak memory from the model's config and pick the largest batch (routes: chunk) that fits.

        Every analysis declares its memory model with it; sizes left out come from the analysis's default config."""
        from analyses.core import planner, registry
        from probes.loading import resolve_device, resolve_dtype
        from probes.errors import ConfigError

        if analysis not in planner.kinds():
            raise ConfigError(f"the planner knows no analysis {analysis!r}.", hint=f"Use one of: {', '.join(planner.kinds())}.")
        config = None if analysis in ("forward", "generate") else registry.get(analysis).default_config()
        defaults = planner.memory_model(analysis).settings(config) if config is not None else {}
        seq_len = seq_len if seq_len is not None else int(defaults.get("seq_len") or 64)
        new_tokens = new_tokens if new_tokens is not None else int(defaults.get("new_tokens") or 0)
        dev = resolve_device(device)
        dt = str(resolve_dtype(dtype, dev)).replace("torch.", "")
        with status(f"Reading the config of {model}"):
            shape = planner.shape_of(model, dtype=dt, revision=revision)
        p = planner.plan(analysis, shape, seq_len=seq_len, batch_size=batch_size, device=dev,
                         free_bytes=planner.parse_bytes(free) if free else None, chunk_mb=chunk_mb, new_tokens=new_tokens,
                         config=config)
        if as_json:
            echo_json({"model": model, "dtype": dt, **p.to_dict()})
        else:
            typer.echo(p.message)

    @run_app.command("sweep")
    def sweep_cmd(
        analysis: str = typer.Argument(..., help="An analysis that declares a checkpoint sweep: sinks, logit-lens or routes."),
        checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Comma-separated revisions (of --model) or folders.",
                                                  callback=non_empty_list),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="A folder of checkpoint folders (ordered by step)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id whose revisions --checkpoints names (e.g. allenai/OLMo-1B-hf)."),
        domain: str = typer.Option("prose", "--domain", "-d", help="sinks/routes: built-in inputs (prose, code, arithmetic, random, repeat)."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="sinks/routes: JSONL (field 'text') or text file instead of --domain.", callback=input_file),
        prompt: str = typer.Option("The Eiffel Tower is located in the city of", "--prompt", "-p", help="logit-lens: the prompt."),
        n_prompts: int = typer.Option(16, "--n-prompts", help="routes: prompts drawn from --domain."),
        settings: List[str] = typer.Option([], "--set", help="The analysis's own options as KEY=VALUE (JSON values), e.g. --set T=64."),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        device_map: Optional[str] = DeviceMapOpt, max_memory: Optional[str] = MaxMemoryOpt,
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Run one analysis on every checkpoint and write one tidy table keyed by checkpoint (resumable)."""
        from analyses.core import checkpoints as ckpts
        from analyses.core.io import iter_records
        from probes.errors import ConfigError

        if (checkpoints is None) == (checkpoint_dir is None):
            raise ConfigError("give exactly one of --checkpoints or --checkpoint-dir.",
                              hint="E.g. --checkpoints step1000,step2000 --model allenai/OLMo-1B-hf, or --checkpoint-dir runs/ckpts.")
        cks = tuple(c.strip() for c in checkpoints.split(",") if c.strip()) if checkpoints else tuple(ckpts.checkpoints_in(checkpoint_dir))
        cfg = ckpts.Config(analysis=ckpts.sweep_name(analysis), checkpoints=cks, model=model, domain=domain, prompt=prompt,
                           n_prompts=n_prompts, settings=_settings(settings))
        texts = [r.text for r in iter_records(input)] if input is not None else None

        with progress_bar() as bar:
            res = ckpts.run(cfg, texts=texts, out=out, backend=backend, device=device, dtype=dtype, device_map=device_map,
                            max_memory=max_memory, progress=bar)
        path = ckpts.output_path(cfg, texts, out)
        report_saved(path)
        summary = {"checkpoints": len(res.checkpoints), "rows": len(res.frame), "metrics": ", ".join(res.frame["metric"].unique())}
        saved(path, as_json, summary)
