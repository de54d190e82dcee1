"""``sonde plan`` (the memory planner's estimate of a run) and ``sonde run sweep`` (one analysis across checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from .common import (app, progress_bar, report_saved, BackendOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxMemoryOpt, OutOpt, echo_json, input_file,
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


_GIVEN = {"--seq-len": "seq_len", "--T": "seq_len", "--batch-size": "batch_size", "--new-tokens": "new_tokens",
          "--chunk-mb": "chunk_mb"}  # sizes any analysis is planned at, when its config has no field of that name


def _value(text: str, default: Any, annotation: str):
    """A size option's text as the config field's type (read from its default, else its annotation): numbers,
    booleans, and tuples written as comma-separated items or ``a:b[:step]`` ranges (``--tokens 0:5000``)."""
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) and "float" not in annotation:
        return int(text)
    if isinstance(default, float) or annotation.startswith("float"):
        return float(text)
    if isinstance(default, tuple) or "tuple" in annotation:
        items: list[Any] = []
        for part in (x.strip() for x in text.split(",") if x.strip()):
            if ":" in part and "int" in annotation:
                items.extend(range(*(int(v) for v in part.split(":"))))
            else:
                try:
                    items.append(int(part) if "int" in annotation else json.loads(part))
                except (ValueError, json.JSONDecodeError):
                    items.append(part)
        return tuple(items)
    if "int" in annotation and text.strip().lstrip("-").isdigit():
        return int(text)
    return text


def _count(opt: str, text: str, least: int) -> int:
    from probes.errors import ConfigError

    n = int(text)
    if n < least:
        raise ConfigError(f"{opt} {n} is below {least}.", hint=f"Give {opt} a whole number ≥ {least}.")
    return n


def _size_options(args: List[str]) -> list[tuple[str, str]]:
    """``["--block-size", "1024", "--T=64"]`` -> ``[("--block-size", "1024"), ("--T", "64")]``."""
    from probes.errors import ConfigError

    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise ConfigError(f"{a!r} is not an option.", hint="Give the analysis's size options as --name VALUE, e.g. --batch-size 8.")
        if "=" in a:
            out.append(tuple(a.split("=", 1)))
            i += 1
        elif i + 1 < len(args):
            out.append((a, args[i + 1]))
            i += 2
        else:
            raise ConfigError(f"option {a} has no value.", hint=f"Write {a} VALUE.")
    return out


def plan_run(analysis: str, options: List[str], *, model: str = "embedded", device: str = "auto", dtype: str = "auto",
             free: str | None = None, revision: str | None = None):
    """The plan of ``sonde run ANALYSIS`` with these size options, from the registry and the model's config only:
    ``(plan, dtype)``. Each option sets the config field of its name (or the one the memory model names it for:
    ``--batch-size`` is bigram's ``batch``), else the size it names (``--seq-len``, ``--batch-size``, ``--new-tokens``,
    ``--chunk-mb``; the memory model's own batch option)."""
    import dataclasses

    from analyses.core import planner
    from probes.errors import ConfigError
    from probes.loading import resolve_device, resolve_dtype

    if analysis not in planner.kinds():
        raise ConfigError(f"the planner knows no analysis {analysis!r}.", hint=f"Use one of: {', '.join(planner.kinds())}.")
    if analysis in ("forward", "generate"):
        mm, config = planner.memory_model(analysis), None
    else:
        spec, mm = planner.analysis_of(analysis)
        config = spec.default_config()
    fields = {f.name: f for f in dataclasses.fields(config)} if config is not None else {}
    alias = dict(mm.fields)
    given: dict[str, Any] = {}
    max_batch = None
    for opt, text in _size_options(options):
        name = alias.get(opt) or opt[2:].replace("-", "_")
        try:
            if opt == mm.option and mm.batch_arg:
                max_batch = _count(opt, text, 1)
            elif opt == mm.option and mm.batch_field:
                config = config.replace(**{mm.batch_field: _count(opt, text, 1)})
            elif name in fields:
                config = config.replace(**{name: _value(text, getattr(config, name), str(fields[name].type))})
            elif opt == mm.option or opt in _GIVEN or opt == mm.seq_option:
                key = "batch_size" if opt == mm.option else ("seq_len" if opt == mm.seq_option else _GIVEN[opt])
                given[key] = _count(opt, text, 0 if key == "new_tokens" else 1)
            else:
                known = sorted({*(f"--{n.replace('_', '-')}" for n in fields), *alias, mm.option, mm.seq_option, *_GIVEN})
                raise ConfigError(f"sonde plan {analysis}: unknown option {opt}.", hint=f"It takes: {', '.join(known)}.")
        except ConfigError as e:
            if e.message.startswith(("sonde plan", opt)):
                raise
            raise ConfigError(f"{opt} {text!r}: {e.message}", hint=e.hint) from None
        except ValueError:
            raise ConfigError(f"{opt} {text!r} is not a value of this option.", hint=f"E.g. {opt} 64.") from None
    sz = {**mm.settings(config), **given} if config is not None else given
    if not sz.get("seq_len"):
        given["seq_len"] = 64  # a prompt's length (the run reads it from the prompt)
    dev = resolve_device(device)
    dt = str(resolve_dtype(dtype, dev)).replace("torch.", "")
    with status(f"Reading the config of {model}"):
        shape = planner.shape_of(model, dtype=dt, revision=revision)
    _, p = planner.plan_config(mm, shape, config, device=str(dev), dtype=dt, free_bytes=planner.parse_bytes(free) if free else None,
                               refuse=False, max_batch=max_batch, **given)
    return p, dt


def _plan_lines(p) -> list[str]:
    from analyses.core.planner import format_bytes as fb

    e = p.estimate
    rest = sorted(((k, v) for k, v in e.parts.items() if k not in e.persistent), key=lambda kv: -kv[1])
    return [p.message,
            f"  total        {fb(e.total)} (weights {fb(e.weights)} + activations {fb(e.activations)})",
            f"  persistent   {', '.join(f'{k} {fb(e.parts[k])}' for k in e.persistent) or 'none'}",
            f"  transient    {', '.join(f'{k} {fb(v)}' for k, v in rest) or 'none'} (the largest counts)",
            f"  setting      {p.setting or 'none'}{' (lowered to fit)' if p.lowered else ''}",
            f"  free now     {fb(p.free)} (the plan uses {fb(p.budget)} of it){'' if p.fits else '; does not fit'}"]


def register(run_app: typer.Typer) -> None:
    @app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def plan_cmd(
        ctx: typer.Context,
        analysis: str = typer.Argument(..., help="A `sonde run` verb (sinks, routes, bigram, bigram-eval, fiber, ...), forward or generate."),
        model: str = typer.Option("embedded", "--model", "-m", help="'embedded', an HF id (local cache) or a local folder (its config is read; no weights load)."),
        device: str = DeviceOpt, dtype: str = DtypeOpt,
        free: Optional[str] = typer.Option(None, "--free", help="Plan for this much free memory (e.g. 24GiB) instead of reading the device."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Revision of a hub id."),
        as_json: bool = JsonOpt,
    ) -> None:
        """Estimate a run's peak memory from the model's config alone, and the setting the run would choose to fit.

        After ANALYSIS, give the analysis's own size options as `sonde run` takes them (`sonde plan bigram --batch-size 32
        --seq-len 128`, `sonde plan sinks --T 512`, `sonde plan fiber --block-size 4096`); those left out come from its
        defaults. Prints the total, weights, activations, the persistent and transient parts, the setting chosen and
        the free memory now; `--json` for all of it. Nothing loads but the config."""
        p, dt = plan_run(analysis, list(ctx.args), model=model, device=device, dtype=dtype, free=free, revision=revision)
        if as_json:
            echo_json({"analysis": analysis, "model": model, "dtype": dt, **p.to_dict()})
        else:
            for line in _plan_lines(p):
                typer.echo(line)

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
