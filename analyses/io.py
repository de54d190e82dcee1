"""Reading user inputs (prompts, text and JSONL files) and checkpointing long batch runs.

Bad input gets one clear message: a file that is not UTF-8 names the byte offset, a malformed
JSONL line names its line number and is skipped or stops the run (``on_error``). Batch runs save
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

__all__ = ["Record", "read_text", "iter_jsonl", "iter_records", "Checkpoint"]


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


def iter_records(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop", text_field: str = "text",
                 domain_field: str = "domain") -> Iterator[Record]:
    """Records from a ``.jsonl`` file (``text`` and optional ``domain`` fields) or a plain text file
    (one record per non-empty line)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".ndjson", ".json"):
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
