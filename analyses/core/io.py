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

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from probes.errors import InputError, SondeWarning, check_input_file, user_file
from probes.reducers import Reducer

__all__ = ["Record", "read_text", "iter_jsonl", "iter_parquet", "iter_hf", "open_hf", "parse_hf_spec", "HFSpec", "iter_records",
           "is_hf_spec", "Checkpoint", "save_state", "load_state", "read_state_header", "private_dir", "work_dir",
           "skipped"]


@dataclass(frozen=True)
class Record:
    """One input item: its text, an optional domain label, its line number, and the raw fields."""

    text: str
    domain: str | None = None
    line: int = 0
    fields: Mapping[str, Any] | None = None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (clear error for a missing file, a folder, a FIFO or device, or other encodings)."""
    p = check_input_file(path, allow_empty=True)
    with user_file(p):
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
    p = check_input_file(path, allow_empty=True)
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
                msg = f"{p.name} line {no} {problem}"
                if on_error == "stop":
                    raise InputError(msg + ".", hint="Fix the line, or pass --on-error skip to skip bad lines.")
                skipped(msg)
                continue
            yield no, obj


def skipped(msg: str) -> None:
    """Report a skipped input item: one :class:`probes.errors.SondeWarning` (the CLI prints it as one
    ``warning: <msg>; skipped.`` line on stderr)."""
    warnings.warn(SondeWarning(f"{msg.rstrip('.')}; skipped."), stacklevel=3)


def _bad_text(msg: str, on_error: str) -> None:
    if on_error == "stop":
        raise InputError(msg, hint="Fix the input, or pass --on-error skip.")
    skipped(msg)


def iter_parquet(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop", text_field: str = "text",
                 domain_field: str = "domain", batch_rows: int = 4096) -> Iterator[Record]:
    """Records from a Parquet file, read in row batches (``line`` is the 1-based row number)."""
    import pyarrow.parquet as pq

    p = check_input_file(path)
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
    batches = pf.iter_batches(batch_size=batch_rows, columns=want)
    while True:
        with user_file(p, "Parquet file"):  # a damaged row group is found only when it is read
            batch = next(batches, None)
        if batch is None:
            break
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
    record per non-empty line). A ``.csv``/``.tsv`` file is refused (its header would read as a prompt); a folder,
    FIFO or device is refused as what it is."""
    if is_hf_spec(path):
        yield from iter_hf(str(path), limit=limit, on_error=on_error, domain_field=domain_field)
        return
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv"):
        raise InputError(f"{str(p)!r} is a {p.suffix[1:].upper()} file; Sonde does not guess which column holds the text.",
                         hint="Convert it to JSONL (one {\"text\": ...} object per line) or Parquet with a 'text' column.")
    if p.suffix == ".parquet":
        yield from iter_parquet(p, on_error=on_error, text_field=text_field, domain_field=domain_field)
    elif p.suffix in (".jsonl", ".ndjson", ".json"):
        for no, obj in iter_jsonl(p, on_error=on_error, required=(text_field,)):
            text = obj[text_field]
            if not isinstance(text, str) or not text.strip():
                msg = f"{p.name} line {no}: field {text_field!r} is empty or not a string."
                if on_error == "stop":
                    raise InputError(msg, hint="Fix the line, or pass --on-error skip.")
                skipped(msg)
                continue
            dom = obj.get(domain_field)
            yield Record(text=text, domain=None if dom is None else str(dom), line=no, fields=obj)
    else:
        for no, line in enumerate(read_text(p).splitlines(), start=1):
            if line.strip():
                yield Record(text=line, line=no)


# ============================================================================== resumable state
#: The one on-disk format of every resumable state (batch checkpoints, merge ledgers, mask training):
#: one safetensors file whose header metadata (plain JSON, read before any tensor) holds the
#: fingerprint, the JSON skeleton of the saved tree, small JSON values and a sha256 digest over all of
#: them and every tensor's bytes; tensors hold the numbers. (1: the same without the digest, not read.)
STATE_FORMAT = 2
_STATE_META = "sonde.state"
_RESERVED = ("__tensor__", "__tuple__", "__map__", "__float__")
#: Test hook: ``SONDE_FAULT_SAVE="K:write"`` ends the process (``os._exit(75)``, no clean-up, like a
#: kill) in the K-th :func:`save_state` of the process after the temporary file is written and before
#: it is renamed into place; ``"K:rename"`` right after the rename, before the caller goes on.
SAVE_FAULT_ENV = "SONDE_FAULT_SAVE"
_SAVES = [0]
_MAX_HEADER = 64 << 20


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if type(obj).__module__ == "numpy":
        if hasattr(obj, "shape") and getattr(obj, "shape", ()) != ():
            return _encode(torch.from_numpy(obj.copy()), tensors)
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):  # torch.Size too
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _RESERVED):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__map__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot save a {type(obj).__name__} in a Sonde state (tensors, numbers, strings, lists and dicts only).")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "__tensor__":
                return tensors[v]
            if k == "__tuple__":
                return tuple(_decode(x, tensors) for x in v)
            if k == "__map__":
                return {_hashable(_decode(a, tensors)): _decode(b, tensors) for a, b in v}
            if k == "__float__":
                return float(v)
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def _fault(stage: str) -> None:
    spec = os.environ.get(SAVE_FAULT_ENV)
    if spec:
        k, _, at = spec.partition(":")
        if at == stage and str(_SAVES[0]) == k.strip():
            os._exit(75)


def save_state(path: str | Path, tree: Any, *, fingerprint: str, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``tree`` (nested dicts/lists/tuples of tensors and JSON scalars) to one safetensors file.

    The file is written under a temporary name in the same folder, flushed to disk, and published by
    one ``os.replace``: a process killed at any instant leaves either the previous state or the new
    one, never a mix. Tensors are stored on the CPU; bfloat16 stays bfloat16. No pickle.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors stores each tensor on its own storage
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    loose: dict[str, torch.Tensor] = {}
    header = {"format": STATE_FORMAT, "fingerprint": fingerprint, "tree": skeleton, "meta": _encode(dict(meta or {}), loose)}
    if loose:
        raise TypeError("save_state: meta holds JSON values only; put tensors in the tree.")
    header["digest"] = _digest(json.loads(json.dumps(header)), out)
    _SAVES[0] += 1
    from .store import clean_stale, scratch_prefix

    clean_stale(path.parent)  # temporary files of killed runs (this user, this machine, process gone)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata={_STATE_META: json.dumps(header)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _fault("write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fault("rename")
    return path


def read_state_header(path: str | Path) -> dict[str, Any] | None:
    """The JSON header of a state file (fingerprint, meta) without reading any tensor; ``None`` when
    the file is missing or is not a Sonde state."""
    info = _any_state_header(path)
    return info if info is not None and info.get("format") == STATE_FORMAT else None


def _any_state_header(path: str | Path) -> dict[str, Any] | None:
    """The header of a Sonde state file of any format version (``None``: not a Sonde state)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                return None
            head = json.loads(f.read(n).decode("utf-8"))
        info = json.loads(head["__metadata__"][_STATE_META])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and type(info.get("format")) is int else None


def load_state(path: str | Path, fingerprint: str) -> tuple[Any, dict[str, Any]] | None:
    """``(tree, meta)`` saved by :func:`save_state` with this ``fingerprint``; ``None`` when the file is
    missing, is not a Sonde state, or belongs to another run (the fingerprint, read from the JSON
    header, is checked before any tensor is read)."""
    info = read_state_header(path)
    if info is None or info.get("fingerprint") != fingerprint:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if info.get("digest") != _digest(info, tensors):
            warnings.warn(SondeWarning(f"ignoring the saved state {str(path)!r} (its contents do not match its digest: "
                                       "altered or damaged); starting over"))
            return None
        return _decode(info["tree"], tensors), _decode(info.get("meta", {}), {})
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        warnings.warn(SondeWarning(f"ignoring the unreadable saved state {str(path)!r} ({type(e).__name__}); starting over."))
        return None


def _digest(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state's JSON header (format, fingerprint, tree skeleton, meta) and every tensor's name,
    dtype, shape and bytes: any change to the file after :func:`save_state` wrote it shows."""
    body = {k: header.get(k) for k in ("format", "fingerprint", "tree", "meta")}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def private_dir(path: str | Path) -> Path:
    """A folder only this user can use (:func:`probes.loading.private_folder`; anything else is one InputError)."""
    from probes.loading import private_folder

    return private_folder(path, what="the run-state folder", error=InputError,
                          hint="Set SONDE_CACHE (or --checkpoint) to a writable folder of your own.")


def work_dir(out_dir: str | Path, kind: str) -> Path:
    """The private scratch folder of a run writing ``out_dir`` (its checkpoint or merge ledger).

    It lives in Sonde's per-user cache (``$SONDE_CACHE``, else ``$XDG_CACHE_HOME/sonde``, else
    ``~/.cache/sonde``) under ``work/<kind>-<hash of the absolute result path>``, never beside the
    result (so nothing appears in the user's folders and no other user can plant or read it: the
    folders are created with mode 0700 and must be owned by this user). The same command finds the
    same folder again, which is how a killed run resumes. The path is returned, not created; the
    first save creates it (:func:`private_dir`).
    """
    from probes.loading import cache_dir

    out = os.path.abspath(Path(out_dir).expanduser())
    digest = hashlib.sha256(os.fsencode(out)).hexdigest()[:20]
    return cache_dir() / "work" / f"{kind}-{digest}"


class Checkpoint:
    """Atomic on-disk progress of a batch run: items done + reducers' partial states.

    One file, ``state.safetensors`` (:func:`save_state`: tensors + a JSON header with the fingerprint
    and the count), replaced by one atomic rename per save, so a run killed at any instant resumes
    from the last completed save with no item lost or counted twice. The folder is private (0700).

    Before a saved state is used it is checked: the file's digest; the count ``n_done`` (an integer,
    at least 0, at most ``n_items`` when the run gives its number of inputs; the same count is kept
    in the header and beside the states); the number of inputs it was made for; each reducer's kind
    and update count against what was recorded at the save; the counts named in ``counts`` (e.g.
    ``extra["skipped"]``: integers between 0 and ``n_done``); with ``exact_counts`` (each item updates
    every reducer once unless it is counted in ``counts``), that updates plus those counts make
    ``n_done``. The fingerprint should bind the run to its inputs (their hash). A state that fails a
    check is not used: the run starts over with one :class:`probes.errors.SondeWarning` line.

    Usage::

        ck = Checkpoint(work_dir(out_dir, "progress"), fingerprint=run_key, n_items=len(items))
        done = ck.restore(reducers)              # number of items already folded in (0 on a fresh run)
        for i, item in enumerate(items):
            if i < done: continue
            ... update reducers ...
            if (i + 1) % every == 0: ck.save(i + 1, reducers)
        ck.clear()
    """

    FILE = "state.safetensors"

    def __init__(self, folder: str | Path, *, fingerprint: str, n_items: int | None = None, counts: tuple[str, ...] = ("skipped",),
                 exact_counts: bool = False):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.n_items = None if n_items is None else int(n_items)
        self.counts = tuple(counts)
        self.exact_counts = bool(exact_counts)
        self.extra: dict[str, Any] = {}

    def save(self, n_done: int, reducers: Mapping[str, Reducer], extra: Mapping[str, Any] | None = None) -> None:
        n_done = int(n_done)
        if n_done < 0 or (self.n_items is not None and n_done > self.n_items):
            raise ValueError(f"Checkpoint.save: n_done={n_done} is outside 0..{self.n_items}.")
        progress = {"n_done": n_done, "n_items": self.n_items, "extra": dict(extra or {}),
                    "updates": {name: int(r.n_updates) for name, r in reducers.items()}}
        private_dir(self.folder)
        save_state(self.folder / self.FILE, {"states": {name: r.state() for name, r in reducers.items()}, "progress": progress},
                   fingerprint=self.fingerprint, meta=progress)

    def restore(self, reducers: Mapping[str, Reducer]) -> int:
        """Load saved states into ``reducers``; returns items done (0 if nothing matches this run, or if
        the saved state fails its checks: then one warning line says so and the reducers stay empty)."""
        got = load_state(self.folder / self.FILE, self.fingerprint)
        if got is None:
            return 0
        tree, meta = got
        problem = self._problem(tree, meta, reducers)
        if problem:
            warnings.warn(SondeWarning(f"ignoring the saved progress {str(self.folder / self.FILE)!r} ({problem}); starting over"))
            return 0
        states, progress = tree["states"], tree["progress"]
        for name, r in reducers.items():
            if name in states:  # a reducer this checkpoint never saw starts empty
                r.load_state(dict(states[name]))
        self.extra = dict(progress["extra"])
        return progress["n_done"]

    def _problem(self, tree: Any, meta: Any, reducers: Mapping[str, Reducer]) -> str | None:
        """What is wrong with a saved checkpoint, or ``None`` when it can be used."""
        if not (isinstance(tree, dict) and isinstance(tree.get("states"), dict) and isinstance(tree.get("progress"), dict)):
            return "not a checkpoint of this version"
        progress, states = tree["progress"], tree["states"]
        if not same_json(meta, progress):
            return "its header and its contents disagree"
        n = progress.get("n_done")
        if not _is_count(n):
            return f"n_done={n!r} is not a count"
        saved_items = progress.get("n_items")
        if saved_items is not None and not _is_count(saved_items):
            return f"n_items={saved_items!r} is not a count"
        if saved_items is not None and n > saved_items:
            return f"n_done={n} exceeds the {saved_items} inputs it was made for"
        if self.n_items is not None:
            if saved_items is not None and saved_items != self.n_items:
                return f"it was made for {saved_items} inputs, this run has {self.n_items}"
            if n > self.n_items:
                return f"n_done={n} exceeds the {self.n_items} inputs of this run"
        extra = progress.get("extra")
        if not isinstance(extra, dict):
            return "its extra values are not a mapping"
        for c in self.counts:
            if c in extra and not (_is_count(extra[c]) and extra[c] <= n):
                return f"{c}={extra[c]!r} is not a count between 0 and n_done={n}"
        updates = progress.get("updates")
        if not isinstance(updates, dict) or set(updates) != set(states):
            return "its reducer list is damaged"
        for name, st in states.items():
            u = st.get("__n_updates__") if isinstance(st, dict) else None
            if not (_is_count(u) and updates[name] == u):
                return f"reducer {name!r} holds {u!r} updates, {updates[name]!r} were saved"
            if n == 0 and u:
                return f"reducer {name!r} holds {u} updates but no item is done"
            if self.exact_counts and u + sum(extra.get(c, 0) for c in self.counts) != n:
                return f"reducer {name!r} holds {u} updates and {', '.join(f'{c}={extra.get(c, 0)}' for c in self.counts)}, not n_done={n}"
            r = reducers.get(name)
            if r is not None and st.get("__kind__") != type(r).__name__:
                return f"reducer {name!r} is a {st.get('__kind__')!r}, this run has a {type(r).__name__}"
        return None

    def clear(self) -> None:
        """Remove the saved progress (its file and temporary files, then the folder if that empties it)."""
        _remove_state_files(self.folder, [self.FILE])


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (``6`` is not ``6.0`` and ``1`` is not ``True``)."""
    try:
        return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return False


def _remove_state_files(folder: Path, names: list[str]) -> None:
    """Delete the named state files of ``folder`` (and this process's or dead runs' temporary files), then
    ``folder`` if that leaves it empty; anything else in it stays."""
    from .store import clean_stale

    for n in names:
        f = folder / n
        if f.is_file() and not f.is_symlink() and _any_state_header(f) is not None:
            f.unlink(missing_ok=True)
    clean_stale(folder)
    try:
        folder.rmdir()
    except OSError:
        pass
