"""Reading user inputs (prompts, text, JSONL and Parquet files, Hugging Face data sets) and
checkpointing long batch runs.

Bad input gets one clear message: a file that is not UTF-8 names the byte offset, a malformed
JSONL line (or Parquet row) names its line (row) number and is skipped or stops the run
(``on_error``). ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` streams a Hugging Face data set when online
and fails with one line when offline. Batch runs save
their reducers' partial states every few batches (:class:`Checkpoint`), so a killed run resumes
where it stopped with no row lost or counted twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from probes.errors import InputError
from probes.reducers import Reducer

__all__ = ["Record", "read_text", "iter_jsonl", "iter_parquet", "iter_hf", "open_hf", "parse_hf_spec", "HFSpec", "iter_records",
           "is_hf_spec", "Checkpoint"]


@dataclass(frozen=True)
class Record:
    """One input item: its text, an optional domain label, its line number, and the raw fields."""

    text: str
    domain: str | None = None
    line: int = 0
    fields: Mapping[str, Any] | None = None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (clear error for a missing file or other encodings)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file {str(p)!r} does not exist.")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{str(p)!r} is not UTF-8 text (bad byte at offset {e.start}).", hint="Convert it, e.g. `iconv -f latin1 -t utf-8`.") from e


def iter_jsonl(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop", text_field: str = "text",
               required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-empty line of a JSONL file.

    A line that is not valid JSON, not UTF-8, not an object, or lacks a ``required`` field raises
    :class:`InputError` naming the line (``on_error="stop"``) or is skipped with a warning
    (``on_error="skip"``).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file {str(p)!r} does not exist.")
    if on_error not in ("skip", "stop"):
        raise InputError(f"on_error={on_error!r}; use 'skip' or 'stop'.")
    with p.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    problem = f"is a JSON {type(obj).__name__}, not an object"
                else:
                    missing = [k for k in required if k not in obj]
                    if missing:
                        problem = f"has no {', '.join(repr(m) for m in missing)} field"
            except UnicodeDecodeError:
                problem = "is not UTF-8"
            except json.JSONDecodeError as e:
                problem = f"is not valid JSON ({e.msg} at column {e.colno})"
            if problem:
                msg = f"{p.name} line {no} {problem}."
                if on_error == "stop":
                    raise InputError(msg, hint="Fix the line, or pass --on-error skip to skip bad lines.")
                warnings.warn(msg + " Skipped.", stacklevel=2)
                continue
            yield no, obj


def _bad_text(msg: str, on_error: str) -> None:
    if on_error == "stop":
        raise InputError(msg, hint="Fix the input, or pass --on-error skip.")
    warnings.warn(msg + " Skipped.", stacklevel=3)


def iter_parquet(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop", text_field: str = "text",
                 domain_field: str = "domain", batch_rows: int = 4096) -> Iterator[Record]:
    """Records from a Parquet file, read in row batches (``line`` is the 1-based row number)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise InputError(f"file {str(p)!r} does not exist.")
    if on_error not in ("skip", "stop"):
        raise InputError(f"on_error={on_error!r}; use 'skip' or 'stop'.")
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises ArrowInvalid for non-Parquet bytes
        raise InputError(f"{str(p)!r} is not a Parquet file ({e}).", hint="Give a .parquet, .jsonl or text file.") from None
    cols = pf.schema_arrow.names
    if text_field not in cols:
        raise InputError(f"{p.name} has no {text_field!r} column (columns: {', '.join(cols)}).",
                         hint=f"Rename the text column to {text_field!r}.")
    want = [text_field] + ([domain_field] if domain_field in cols else [])
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=want):
        d = batch.to_pydict()
        for j, text in enumerate(d[text_field]):
            row += 1
            if not isinstance(text, str) or not text.strip():
                _bad_text(f"{p.name} row {row}: column {text_field!r} is empty or not a string.", on_error)
                continue
            dom = d[domain_field][j] if domain_field in d else None
            yield Record(text=text, domain=None if dom is None else str(dom), line=row,
                         fields={k: d[k][j] for k in d})


_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")


@dataclass(frozen=True)
class HFSpec:
    """A Hugging Face data set reference parsed from ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``."""

    name: str
    config: str | None
    split: str
    field: str = "text"


def is_hf_spec(source: Any) -> bool:
    return isinstance(source, (str, Path)) and str(source).startswith("hf:")


def parse_hf_spec(spec: str) -> HFSpec:
    """``hf:NAME:SPLIT``, ``hf:NAME:CONFIG:SPLIT``, ``hf:NAME:SPLIT:FIELD`` (split is one of train, test,
    validation, … or has a slice ``train[:100]``) or ``hf:NAME:CONFIG:SPLIT:FIELD``."""
    parts = spec[3:].split(":") if is_hf_spec(spec) else []
    if len(parts) < 2 or len(parts) > 4 or not all(parts):
        raise InputError(f"{spec!r} is not a data set reference.",
                         hint="Use hf:NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf:wikitext:wikitext-2-raw-v1:train:text.")
    if len(parts) == 2:
        return HFSpec(parts[0], None, parts[1])
    if len(parts) == 3:
        if parts[1].split("[")[0] in _SPLITS:
            return HFSpec(parts[0], None, parts[1], parts[2])
        return HFSpec(parts[0], parts[1], parts[2])
    return HFSpec(parts[0], parts[1], parts[2], parts[3])


def open_hf(spec: str | HFSpec) -> tuple[str, Iterator[dict[str, Any]]]:
    """``(label, rows)``: a Hugging Face data set streamed row by row (``datasets.load_dataset(..., streaming=True)``).

    Offline (``HF_HUB_OFFLINE=1`` or no network), without the ``datasets`` package, or for an unknown set this
    raises one :class:`InputError` naming the set.
    """
    import itertools

    s = parse_hf_spec(spec) if isinstance(spec, str) else spec
    label = f"hf:{s.name}" + (f":{s.config}" if s.config else "") + f":{s.split}"
    try:
        import datasets
    except ImportError:
        raise InputError(f"{label} needs the 'datasets' package.", hint="pip install 'sonde[cluster]'.") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        it = iter(datasets.load_dataset(s.name, s.config, split=s.split, streaming=True))
        first = next(it, None)
    except Exception as e:
        why = "offline (HF_HUB_OFFLINE is set)" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise InputError(f"cannot stream {label}: {why}.",
                         hint="Go online (unset HF_HUB_OFFLINE), or export the data set to JSONL/Parquet and pass --input FILE.") from None
    return label, itertools.chain([] if first is None else [first], it)


def iter_hf(spec: str | HFSpec, *, limit: int | None = None, on_error: Literal["skip", "stop"] = "stop",
            domain_field: str = "domain") -> Iterator[Record]:
    """Records streamed from a Hugging Face data set (see :func:`open_hf`).

    ``line`` is the 1-based row number; ``limit`` stops after that many rows.
    """
    s = parse_hf_spec(spec) if isinstance(spec, str) else spec
    label, rows = open_hf(s)
    for row, obj in enumerate(rows, start=1):
        if limit is not None and row > limit:
            break
        if s.field not in obj:
            raise InputError(f"{label} has no field {s.field!r} (fields: {', '.join(obj)}).",
                             hint="Name the text field: hf:NAME[:CONFIG]:SPLIT:FIELD.")
        text = obj[s.field]
        if not isinstance(text, str) or not text.strip():
            _bad_text(f"{label} row {row}: field {s.field!r} is empty or not a string.", on_error)
        else:
            dom = obj.get(domain_field)
            yield Record(text=text, domain=None if dom is None else str(dom), line=row, fields=obj)


def iter_records(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop", text_field: str = "text",
                 domain_field: str = "domain", limit: int | None = None) -> Iterator[Record]:
    """Records from a ``.jsonl`` file (``text`` and optional ``domain`` fields), a ``.parquet`` file (same
    columns), ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` (streamed; ``limit`` rows) or a plain text file (one
    record per non-empty line)."""
    if is_hf_spec(path):
        yield from iter_hf(str(path), limit=limit, on_error=on_error, domain_field=domain_field)
        return
    p = Path(path)
    if p.suffix == ".parquet":
        yield from iter_parquet(p, on_error=on_error, text_field=text_field, domain_field=domain_field)
    elif p.suffix in (".jsonl", ".ndjson", ".json"):
        for no, obj in iter_jsonl(p, on_error=on_error, required=(text_field,)):
            text = obj[text_field]
            if not isinstance(text, str) or not text.strip():
                msg = f"{p.name} line {no}: field {text_field!r} is empty or not a string."
                if on_error == "stop":
                    raise InputError(msg, hint="Fix the line, or pass --on-error skip.")
                warnings.warn(msg + " Skipped.", stacklevel=2)
                continue
            dom = obj.get(domain_field)
            yield Record(text=text, domain=None if dom is None else str(dom), line=no, fields=obj)
    else:
        for no, line in enumerate(read_text(p).splitlines(), start=1):
            if line.strip():
                yield Record(text=line, line=no)


class Checkpoint:
    """Atomic on-disk progress of a batch run: items done + reducers' partial states (safetensors + JSON).

    Usage::

        ck = Checkpoint(out_dir / ".progress", fingerprint=run_key)
        done = ck.restore(reducers)              # number of items already folded in (0 on a fresh run)
        for i, item in enumerate(items):
            if i < done: continue
            ... update reducers ...
            if (i + 1) % every == 0: ck.save(i + 1, reducers)
        ck.clear()
    """

    def __init__(self, folder: str | Path, *, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def save(self, n_done: int, reducers: Mapping[str, Reducer], extra: Mapping[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {"fingerprint": self.fingerprint, "n_done": n_done, "extra": dict(extra or {}), "states": {}}
        for name, r in reducers.items():
            st = r.state()
            m = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{name}::{k}"] = v.contiguous()
                elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
                    for j, t in enumerate(v):
                        tensors[f"{name}::{k}::{j}"] = t.contiguous()
                    m[k] = {"__tensor_list__": len(v)}
                else:
                    m[k] = v
            meta["states"][name] = m
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ck-", dir=self.folder))
        save_file(tensors, str(tmp / "states.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(meta, default=str))
        # publish: replace the two files (progress.json last, so it never points at missing tensors)
        os.replace(tmp / "states.safetensors", self.folder / "states.safetensors.new")
        os.replace(self.folder / "states.safetensors.new", self.folder / "states.safetensors")
        os.replace(tmp / "progress.json", self.folder / "progress.json")
        tmp.rmdir()

    def restore(self, reducers: Mapping[str, Reducer]) -> int:
        """Load saved states into ``reducers``; returns items done (0 if nothing matches this run)."""
        prog = self.folder / "progress.json"
        if not prog.is_file():
            return 0
        meta = json.loads(prog.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            return 0
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / "states.safetensors"))
        for name, r in reducers.items():
            if name not in meta["states"]:  # a reducer this checkpoint never saw starts empty
                continue
            m = dict(meta["states"][name])
            for k in list(m):
                if isinstance(m[k], dict) and "__tensor_list__" in m[k]:
                    m[k] = [tensors[f"{name}::{k}::{j}"] for j in range(m[k]["__tensor_list__"])]
            for key, t in tensors.items():
                nm, _, k = key.partition("::")
                if nm == name and "::" not in k:
                    m[k] = t
            r.load_state(m)
        self.extra = meta.get("extra", {})
        return int(meta["n_done"])

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
