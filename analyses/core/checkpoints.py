"""Checkpoint sweeps: one analysis across model revisions or training checkpoints, one tidy table.

A sweep loads each checkpoint in turn (a hub revision of ``model``, or a local folder saved with
``save_pretrained``), runs one analysis on the same inputs with the same config, reduces its result
to a few per-checkpoint numbers and stacks them into one frame keyed by checkpoint::

    checkpoint, order, step, source, metric, layer, head, value

Each sweepable analysis declares how a checkpoint runs it and which rows it keeps
(:class:`analyses.core.registry.Sweep`, beside its code): sinks keep ``sink_pct``, ``sink_pct_layer``,
``alpha`` and ``resid_peak_ratio``; the logit lens ``top1_agree`` and ``p_final`` per layer; routes (dataset
mode) ``head_freq``/``head_mean`` per head and ``ffn_freq``/``ffn_mean`` per layer. :func:`sweepable` lists them.

Resumable: each finished checkpoint's rows are written at once (atomically) to ``<i>.parquet`` in a
private work folder of the per-user cache (:func:`analyses.core.io.work_dir`, keyed by the result path)
beside a JSON fingerprint of the sweep (config, inputs, and for local checkpoint folders the names,
sizes, mtimes and header hashes of their files); a re-run with the same settings skips the
checkpoints already there, so a killed sweep loses at most the checkpoint it was on. The work folder
is removed once the result is saved.
Checkpoint sweeps in the literature: attention sinks across Pythia/OLMo checkpoints (Gu et al.
2024, §4), dormant heads across OLMo checkpoints (Guo et al. 2024, §4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, InputError, ModelLoadError

from . import base, io, registry, store
from .base import stored
from .progress import ProgressFn, phase

__all__ = ["Config", "SweepResult", "Checkpoint", "run", "output_path", "resolve_checkpoints", "checkpoints_in", "summarize",
           "sweepable", "metric_rows"]

COLUMNS = ["checkpoint", "order", "step", "source", "metric", "layer", "head", "value"]


@dataclass(frozen=True, kw_only=True)
class Config(base.Config):
    """A sweep: which analysis, on which checkpoints, with which inputs.

    ``settings`` are the analysis's own Config fields (e.g. ``{"T": 64, "n_samples": 32}`` for sinks);
    ``domain`` (sinks, routes) or ``prompt`` (logit_lens) picks the inputs, identical for every checkpoint.
    """

    analysis: str = "sinks"  # a sweepable analysis (:func:`sweepable`): its CLI verb or result name
    checkpoints: tuple[str, ...] = ()
    model: str | None = None  # hub id whose revisions the checkpoints name; None = folders / full ids
    domain: str = "prose"
    prompt: str = "The Eiffel Tower is located in the city of"
    n_prompts: int = 16  # routes: prompts drawn from ``domain`` when no texts are given
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        _spec(self.analysis)
        if not self.checkpoints:
            raise ConfigError("no checkpoint was given.",
                              hint="Pass --checkpoints a,b,c (revisions or folders) or --checkpoint-dir DIR.")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            dup = sorted({c for c in self.checkpoints if self.checkpoints.count(c) > 1})
            raise ConfigError(f"checkpoints repeat: {dup}.", hint="List each checkpoint once.")
        if not isinstance(self.n_prompts, int) or self.n_prompts < 1:
            raise ConfigError(f"n_prompts={self.n_prompts!r}; use a positive integer.")
        if not isinstance(self.settings, dict):
            raise ConfigError(f"settings must be a dict of the analysis's Config fields, got {type(self.settings).__name__}.")
        self.analysis_config()  # validates the settings against the analysis's Config

    def analysis_config(self) -> base.Config:
        """The analysis's own Config built from ``settings``."""
        return _config_class(self.analysis).from_dict(self.settings)


def sweepable() -> list[str]:
    """The analyses a checkpoint sweep can run (each declares a :class:`analyses.core.registry.Sweep`)."""
    return sorted(registry.sweepable())


def _spec(analysis: str) -> registry.Analysis:
    """The declaration of a sweepable analysis, by CLI verb or result name (``logit_lens`` = ``logit-lens``)."""
    specs = registry.sweepable()
    for name, spec in specs.items():
        if analysis in (name, spec.name, name.replace("-", "_")):
            return spec
    raise ConfigError(f"analysis={analysis!r} cannot be swept.", hint=f"Use one of {', '.join(sorted(specs))}.")


def sweep_name(analysis: str) -> str:
    """The name a sweep stores for ``analysis`` (``logit-lens`` -> ``logit_lens``); unknown names are refused."""
    spec = _spec(analysis)
    return next(k for k, v in registry.sweepable().items() if v is spec).replace("-", "_")


def _config_class(analysis: str):
    spec = _spec(analysis)
    return spec.sweep.config or spec.config


# ----------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """One point of a sweep: its label, where it loads from, and its training step when the label has one."""

    label: str
    name: str  # what load_model gets (folder, or hub id)
    revision: str | None
    step: int | None


def _step_of(label: str) -> int | None:
    """Training step from names like ``step1000``, ``step-1000``, ``checkpoint-1000``, ``stage1-step1000-tokens2B``."""
    m = re.search(r"(?:step|checkpoint|ckpt|iter)[-_]?(\d+)", label, flags=re.I) or re.fullmatch(r"\D*(\d+)\D*", label)
    return int(m.group(1)) if m else None


def checkpoints_in(folder: str | Path) -> list[str]:
    """Sub-folders of ``folder`` that hold a saved model (``config.json``), ordered by step then name."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"--checkpoint-dir {str(root)!r} is not a folder.")
    subs = [p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if not subs:
        raise InputError(f"{str(root)!r} holds no checkpoint folder (a sub-folder with config.json).",
                         hint="Save each checkpoint with model.save_pretrained(dir/step1000, safe_serialization=True).")
    subs.sort(key=lambda p: (_step_of(p.name) is None, _step_of(p.name) or 0, p.name))
    return [str(p) for p in subs]


def resolve_checkpoints(checkpoints: Sequence[str], model: str | None = None) -> list[Checkpoint]:
    """Each spec is a local folder, or (with ``model``) a revision of that hub id, or a full model id."""
    out = []
    for spec in checkpoints:
        p = Path(spec).expanduser()
        if p.exists() or spec.startswith((".", "/", "~")):
            out.append(Checkpoint(label=p.name, name=str(p), revision=None, step=_step_of(p.name)))
        elif model:
            out.append(Checkpoint(label=spec, name=model, revision=spec, step=_step_of(spec)))
        else:
            out.append(Checkpoint(label=spec, name=spec, revision=None, step=_step_of(spec)))
    return out


# ----------------------------------------------------------------------------- per-checkpoint numbers
def metric_rows(metric: str, values: torch.Tensor, *, layer_offset: int = 0) -> list[dict]:
    """``[]``, ``[L]`` or ``[L, H]`` values -> sweep rows ``metric, layer, head, value`` (``layer = index + layer_offset``)."""
    v = values.detach().float().cpu()
    if v.ndim == 0:
        return [{"metric": metric, "layer": None, "head": None, "value": float(v)}]
    if v.ndim == 1:
        return [{"metric": metric, "layer": l + layer_offset, "head": None, "value": float(v[l])} for l in range(v.shape[0])]
    return [{"metric": metric, "layer": l + layer_offset, "head": h, "value": float(v[l, h])}
            for l in range(v.shape[0]) for h in range(v.shape[1])]


def summarize(result: base.Result) -> pd.DataFrame:
    """A result's sweep rows: ``metric, layer, head, value`` (the rows its analysis declares)."""
    spec = next((s for s in registry.sweepable().values() if s.name == result.analysis), None)
    if spec is None:
        raise ConfigError(f"a {type(result).__name__} cannot be summarized for a sweep.", hint=f"Sweep one of {', '.join(sweepable())}.")
    df = pd.DataFrame(spec.sweep.rows(result), columns=["metric", "layer", "head", "value"])
    df["layer"] = df["layer"].astype("Int64")
    df["head"] = df["head"].astype("Int64")
    return df


def _run_one(probe, cfg: Config, texts: Sequence[str] | None, progress: ProgressFn | None = None) -> base.Result:
    return _spec(cfg.analysis).sweep.run(probe, cfg.analysis_config(), texts=texts, domain=cfg.domain, prompt=cfg.prompt,
                                          n_prompts=cfg.n_prompts, progress=progress)


# ----------------------------------------------------------------------------- result
@base.register_result
@dataclass(frozen=True, kw_only=True)
class SweepResult(base.Result):
    """The sweep's tidy frame (columns :data:`COLUMNS`) and the checkpoints in order."""

    analysis: ClassVar[str] = "sweep"

    frame: pd.DataFrame = stored("table", key="main")
    checkpoints: tuple[str, ...] = stored("extra", default=())

    saved_views: ClassVar = ()

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def pivot(self, metric: str) -> pd.DataFrame:
        """One metric as a checkpoint × component table (columns ``L{l}H{h}``, ``L{l}`` or ``all``; rows in sweep order)."""
        df = self.frame[self.frame["metric"] == metric].copy()
        if df.empty:
            raise ConfigError(f"metric {metric!r} is not in this sweep.", hint=f"Metrics: {', '.join(self.frame['metric'].unique())}.")
        df["component"] = [("all" if pd.isna(l) else f"L{l}") + ("" if pd.isna(h) else f"H{h}") for l, h in zip(df["layer"], df["head"])]
        order = list(dict.fromkeys(df.sort_values("order")["checkpoint"]))
        cols = list(dict.fromkeys(df["component"]))
        return df.pivot(index="checkpoint", columns="component", values="value").loc[order, cols]

    def plot(self, metric: str | None = None):
        """A metric (default: the first) across checkpoints; one line per layer (mean over heads)."""
        import plotly.express as px

        metric = metric or str(self.frame["metric"].iloc[0])
        df = self.frame[self.frame["metric"] == metric].copy()
        df["layer"] = df["layer"].astype("float").fillna(-99)
        g = df.groupby(["order", "checkpoint", "layer"], as_index=False)["value"].mean()
        fig = px.line(g, x="checkpoint", y="value", color=g["layer"].map(lambda l: "all" if l == -99 else f"L{int(l)}"),
                      markers=True, title=f"{metric} across checkpoints")
        fig.update_layout(legend_title_text="layer")
        return fig


# ----------------------------------------------------------------------------- entry point
def _content_fingerprint(ck: Checkpoint) -> Any:
    """What a local checkpoint folder holds: for each weight/config file its name, size, mtime and a
    hash of its first and last MiB (a safetensors file's first bytes are its header: tensor names,
    shapes, dtypes and offsets), so retraining into the same folder names is noticed without reading
    whole checkpoints. Hub revisions are named by their revision (a commit pins them)."""
    p = Path(ck.name).expanduser()
    if ck.revision is not None or not p.is_dir():
        return None
    out = []
    for f in sorted(p.iterdir()):
        if not f.is_file() or not f.name.endswith((".safetensors", ".bin", ".json", ".model", ".gguf", ".pt")):
            continue
        st = f.stat()
        h = hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
        out.append([f.name, st.st_size, st.st_mtime_ns, h.hexdigest()[:16]])
    return out


def _fingerprint(cfg: Config, texts: Sequence[str] | None) -> str:
    content = [_content_fingerprint(ck) for ck in resolve_checkpoints(cfg.checkpoints, cfg.model)]
    blob = json.dumps({"config": cfg.to_dict(), "texts": store.hash_inputs(list(texts)) if texts else None, "content": content},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_path(config: Config, texts: Sequence[str] | None = None, out: str | Path | None = None) -> Path:
    """Where :func:`run` saves the sweep (``out``, else ``<results root>/sweep-<analysis>-<fingerprint>``)."""
    return Path(out) if out is not None else store.results_root() / f"sweep-{config.analysis}-{_fingerprint(config, texts)}"


def run(config: Config, *, texts: Sequence[str] | None = None, out: str | Path | None = None,
        load: Callable[[Checkpoint], Any] | None = None, backend: str = "nnsight", device: str = "auto",
        dtype: str = "auto", device_map: str | dict | None = None, max_memory: str | dict | None = None,
        progress: ProgressFn | None = None) -> SweepResult:
    """Run ``config.analysis`` on every checkpoint; save and return the stacked frame.

    Args:
        config: :class:`Config`.
        texts: the inputs for sinks/routes (default: ``config.domain``'s built-in texts).
        out: result folder (default ``<results root>/sweep-<analysis>-<fingerprint>``); finished
            checkpoints are kept in a private work folder so a re-run resumes (removed on success).
        load: ``load(checkpoint) -> probe`` (default :func:`probes.load_model` with the options below).
        progress: :class:`~analyses.core.progress.Progress` events: phase ``checkpoints`` (``info``: the checkpoint's
            label and ``done`` or ``skipped``, when resumed), and each checkpoint's own phases, named
            ``<label>: <phase>``.
    """
    if not isinstance(config, Config):
        raise ConfigError(f"config must be analyses.core.checkpoints.Config, got {type(config).__name__}.")
    cks = resolve_checkpoints(config.checkpoints, config.model)
    fp = _fingerprint(config, texts)
    default_out = out is None
    out = output_path(config, texts, out)
    store.check_destination(out, replace=True if default_out else None)
    parts = io.work_dir(out, "sweep-parts")  # made when the first checkpoint is done: a refused run leaves none
    meta = parts / "sweep.json"
    same = False
    if os.path.lexists(parts):
        io.private_dir(parts)
        try:
            same = json.loads(meta.read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if not same:
            for old in parts.glob("*.parquet"):  # another sweep's leftovers (in our private folder): start over
                old.unlink()

    if load is None:
        from probes import load_model

        def load(ck: Checkpoint):
            return load_model(ck.name, revision=ck.revision, backend=backend, device=device, dtype=dtype,
                              device_map=device_map, max_memory=max_memory)

    timer = base.Timer()
    frames, model_info = [], None
    bar = phase(progress, "checkpoints", len(cks), "checkpoints")
    for i, ck in enumerate(cks):
        path = parts / f"{i:04d}.parquet"
        if path.is_file():
            frames.append(pd.read_parquet(path))
            bar.advance(checkpoint=ck.label, status="skipped")
            continue
        with timer(f"checkpoint {ck.label}"):
            try:
                probe = load(ck)
            except ModelLoadError as e:
                raise ModelLoadError(f"checkpoint {ck.label!r}: {e.message}", hint=e.hint) from e
            inner = None if progress is None else (lambda ev, ck=ck: progress(dataclasses.replace(ev, phase=f"{ck.label}: {ev.phase}")))
            res = _run_one(probe, config, texts, progress=inner)
            df = summarize(res)
            df.insert(0, "checkpoint", ck.label)
            df.insert(1, "order", i)
            df.insert(2, "step", ck.step)
            df.insert(3, "source", ck.name if ck.revision is None else f"{ck.name}@{ck.revision}")
            df["step"] = df["step"].astype("Int64")
            model_info = probe.info.to_dict()
            del probe, res
        if not same:
            io.private_dir(parts)
            meta.write_text(json.dumps({"fingerprint": fp, "config": config.to_dict()}, default=str))
            same = True
        _write_atomic(df, path)
        frames.append(df)
        bar.advance(checkpoint=ck.label, status="done")
    frame = pd.concat(frames, ignore_index=True)[COLUMNS]
    model = {"name": config.model or "checkpoints", "fingerprint": fp,
             **({"family": model_info.get("family"), "n_layers": model_info.get("n_layers")} if model_info else {})}
    res = SweepResult(config=config, model=model, input_hash=fp, timings=timer.seconds, frame=frame,
                      checkpoints=tuple(ck.label for ck in cks))
    res.save(out, replace=default_out)  # the default folder is this sweep's own (named by its fingerprint)
    shutil.rmtree(parts, ignore_errors=True)
    return res
