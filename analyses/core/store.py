"""The results store: one folder per result, the same format for every analysis.

A result folder holds

* ``manifest.json``: analysis name, model (name, fingerprint, summary), config, input hash, library
  versions, device, timings, created-at, and the list of tables and arrays;
* ``<table>.parquet`` for each tidy table;
* ``arrays.safetensors`` with the result's arrays (no pickle anywhere).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place last,
so a killed process never leaves a folder that reads as complete. Nothing that is not a Sonde
result is ever deleted or overwritten: the destination must be new, an empty folder, or an existing
Sonde result (a folder with a valid manifest), and an existing result is replaced only when asked
(``replace=True``, the CLI's ``--replace``) or when it holds the very same content key in its
content-keyed default folder (``<results root>/<key>``: a re-computation of the same thing). The new
result is written beside the old one first, then swapped in; the old one is removed only once the
new one is in place, and it survives any failure before that. Results are keyed by content
(:func:`result_key`: analysis + model fingerprint + config + input hash), so the CLI, notebooks and
the dashboard find each other's results instead of recomputing them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import re
import tempfile
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from probes.errors import InputError, SondeWarning

__all__ = [
    "MANIFEST",
    "results_root",
    "result_key",
    "hash_inputs",
    "write_result",
    "read_result",
    "read_manifest",
    "list_results",
    "find_result",
    "StoredResult",
    "library_versions",
    "check_destination",
    "replacing",
    "ResultExistsError",
    "is_result",
]

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
FORMAT_VERSION = 1


class ResultExistsError(InputError):
    """The destination already holds a Sonde result and replacing it was not asked for."""


_REPLACE: ContextVar[bool] = ContextVar("sonde_replace_results", default=False)


@contextmanager
def replacing(allow: bool = True):
    """Within this block, :func:`write_result` may replace existing Sonde results (the CLI's ``--replace``)."""
    token = _REPLACE.set(bool(allow))
    try:
        yield
    finally:
        _REPLACE.reset(token)


def _load_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest when it is a valid Sonde manifest (a JSON object with ``analysis``), else ``None``."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("analysis"), str) else None


def is_result(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a valid Sonde manifest."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and _load_manifest(p) is not None


def _first_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_destination(out_dir: str | Path, *, replace: bool | None = None, key: str | None = None) -> Path:
    """Refuse, before any work, a result destination that would lose data or cannot be written.

    Allowed: a new path whose nearest existing ancestor is a writable folder, an empty folder, or a
    Sonde result when ``replace`` (or the same ``key`` in its content-keyed default folder). Refused
    with :class:`InputError` (:class:`ResultExistsError` for a result): a file, a non-empty folder
    without a valid Sonde manifest, a link, an unwritable location.
    """
    out = Path(out_dir).expanduser()
    replace = _REPLACE.get() if replace is None else bool(replace)
    if os.path.lexists(out):
        if out.is_symlink():
            raise InputError(f"{str(out)!r} is a symbolic link; refusing to write a result through it.",
                             hint="Give a new folder for --out.")
        if not out.is_dir():
            raise InputError(f"{str(out)!r} is a file, not a result folder; refusing to overwrite it.",
                             hint="Give a new folder for --out.")
        try:
            empty = not any(os.scandir(out))
        except OSError as e:
            raise InputError(f"cannot read the folder {str(out)!r} ({e.strerror or e}).") from None
        if not empty:
            man = _load_manifest(out)
            if man is None:
                raise InputError(f"{str(out)!r} is a non-empty folder that is not a Sonde result; refusing to write into it.",
                                 hint="Give a new or empty folder for --out.")
            same = key is not None and man.get("key") == key and out.name == key
            if not (replace or same):
                raise ResultExistsError(f"{str(out)!r} already holds a Sonde result ({man['analysis']}); not replacing it.",
                                        hint="Pass --replace (Python: replace=True) to replace it, or give another --out.")
        base = out.parent
    else:
        base = _first_existing(out.parent)
        if not base.is_dir():
            raise InputError(f"cannot write {str(out)!r}: {str(base)!r} is not a folder.", hint="Give another --out.")
    try:  # a real write test (permissions, read-only file systems, quotas), removed at once
        probe = tempfile.mkdtemp(prefix=".sonde-write-test-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {str(base)!r} is not writable ({e.strerror or e}).",
                         hint="Give a writable --out.") from None
    return out


def results_root() -> Path:
    """Default folder for results: ``$SONDE_RESULTS`` or ``./sonde-results``."""
    return Path(os.environ.get("SONDE_RESULTS", "sonde-results")).expanduser()


def _canon(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canon(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_inputs(*parts: Any) -> str:
    """Stable hash of inputs (texts, token ids, file contents, tensors)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray)):
            h.update(p)
        else:
            h.update(json.dumps(_canon(p), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def result_key(analysis: str, model_fingerprint: str, config: Mapping[str, Any], input_hash: str) -> str:
    """Content key of a result: same analysis, model, config and inputs -> same key."""
    return f"{analysis}-{hash_inputs(analysis, model_fingerprint, dict(config), input_hash)}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("sonde", "torch", "transformers", "transformer-lens", "nnsight", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except Exception:
            pass
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def write_result(
    out_dir: str | Path,
    *,
    analysis: str,
    model: Mapping[str, Any],
    config: Mapping[str, Any],
    input_hash: str,
    tables: Mapping[str, pd.DataFrame] | None = None,
    arrays: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    device: str | None = None,
    replace: bool = False,
) -> Path:
    """Write a result folder atomically and return its path.

    ``extra`` holds small JSON-able values (scalars, short lists, graphs as node-link dicts).
    ``out_dir`` must be new, an empty folder, or a Sonde result; an existing result is replaced only
    with ``replace=True`` (or inside :func:`replacing`), or when it is the same content key in its
    content-keyed folder. Otherwise :class:`InputError` (:class:`ResultExistsError`) and nothing is
    touched. The old result is removed only after the new one is in place.
    """
    out_dir = Path(out_dir).expanduser()
    key = result_key(analysis, str(model.get("fingerprint", "")), config, input_hash)
    check_destination(out_dir, replace=replace or _REPLACE.get(), key=key)
    made: list[Path] = []
    p = out_dir.parent
    while not os.path.lexists(p) and p != p.parent:
        made.append(p)
        p = p.parent
    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tables = dict(tables or {})
        arrays = {k: v.detach().cpu().contiguous() for k, v in (arrays or {}).items()}
        for name in tables:
            _check_table_name(name)
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        if arrays:
            from safetensors.torch import save_file

            save_file({k: (v.to(torch.float32) if v.dtype == torch.bfloat16 else v) for k, v in arrays.items()}, str(tmp / ARRAYS))
        manifest = {
            "format": FORMAT_VERSION,
            "analysis": analysis,
            "key": key,
            "model": _jsonable(model),
            "config": _jsonable(config),
            "input_hash": input_hash,
            "versions": library_versions(),
            "device": device or str(model.get("device", "cpu")),
            "timings": _jsonable(dict(timings or {})),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tables": sorted(tables),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in arrays.items()},
            "extra": _jsonable(dict(extra or {})),
        }
        # the manifest is written last inside the temp folder; the rename publishes everything at once
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _publish(tmp, out_dir)
    except OSError as e:
        _cleanup(tmp, made)
        raise InputError(f"cannot write the result {str(out_dir)!r} ({e.strerror or e}).",
                         hint="Check the free space and permissions of --out.") from None
    except BaseException:
        _cleanup(tmp, made)
        raise
    return out_dir


def _cleanup(tmp: Path | None, made: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for d in made:  # parents this call created, innermost first
        try:
            d.rmdir()
        except OSError:
            break


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to ``out_dir``. An existing result is swapped out in one atomic
    exchange where the system has one (else set aside by a rename and put back if the second rename
    fails), and removed only after the new one is in place."""
    if os.path.lexists(out_dir) and (not out_dir.is_dir() or any(os.scandir(out_dir))):
        if out_dir.is_symlink() or _load_manifest(out_dir) is None:  # changed since the check: never touch it
            raise InputError(f"{str(out_dir)!r} is no longer empty or a Sonde result; refusing to replace it.",
                             hint="Give a new folder for --out.")
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old result
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:  # new, or an empty folder (rename(2) replaces an empty directory)
        os.replace(tmp, out_dir)


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")


def _check_table_name(name: Any) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name) or ".." in name:
        raise InputError(f"table name {name!r} is not allowed (letters, digits, '_', '-', '.'; no path).",
                         hint="The manifest may be damaged; re-run the analysis.")
    return name


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a result folder (:class:`InputError` when missing, malformed or not an object)."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise InputError(f"{str(p)!r} is not a Sonde result folder (no {MANIFEST}).", hint="`sonde results ls` lists saved results.")
    try:
        m = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{str(p / MANIFEST)!r} cannot be read ({type(e).__name__}); the result is damaged.",
                         hint="Re-run the analysis to write it again.") from None
    if not isinstance(m, dict) or not isinstance(m.get("analysis"), str):
        raise InputError(f"{str(p / MANIFEST)!r} is not a Sonde manifest (a JSON object with an 'analysis').",
                         hint="Re-run the analysis to write it again.")
    return m


@dataclass(frozen=True)
class StoredResult:
    """A result folder read back: manifest, tables and arrays."""

    path: Path
    manifest: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    arrays: dict[str, torch.Tensor]

    @property
    def analysis(self) -> str:
        return self.manifest["analysis"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})


def read_result(path: str | Path) -> StoredResult:
    p = Path(path)
    man = read_manifest(p)
    names = man.get("tables", [])
    if not isinstance(names, list):
        raise InputError(f"{str(p / MANIFEST)!r} lists its tables wrongly (not a list).", hint="Re-run the analysis.")
    tables = {}
    for name in names:
        _check_table_name(name)
        f = p / f"{name}.parquet"
        if not f.is_file():
            raise InputError(f"{str(p)!r} lacks its table {name!r} ({f.name}); the result is incomplete.",
                             hint="Re-run the analysis.")
        tables[name] = pd.read_parquet(f)
    arrays: dict[str, torch.Tensor] = {}
    if (p / ARRAYS).is_file():
        from safetensors.torch import load_file

        arrays = load_file(str(p / ARRAYS))
    return StoredResult(p, man, tables, arrays)


def list_results(root: str | Path | None = None) -> pd.DataFrame:
    """One row per complete result folder under ``root`` (temporary folders are skipped; a damaged
    manifest is skipped with one :class:`probes.errors.SondeWarning`)."""
    root = Path(root) if root is not None else results_root()
    rows = []
    if root.is_dir():
        for d in sorted(root.rglob(MANIFEST)):
            folder = d.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            try:
                m = read_manifest(folder)
            except InputError as e:
                warnings.warn(SondeWarning(f"{e.message.rstrip('.')}; skipped."), stacklevel=2)
                continue
            timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
            model = m.get("model") if isinstance(m.get("model"), dict) else {}
            rows.append({
                "path": str(folder), "analysis": m.get("analysis"), "model": model.get("name"),
                "created_at": m.get("created_at"), "key": m.get("key"),
                "seconds": sum(v for v in timings.values() if isinstance(v, (int, float))),
            })
    return pd.DataFrame(rows, columns=["path", "analysis", "model", "created_at", "key", "seconds"])


def find_result(key: str, root: str | Path | None = None) -> Path | None:
    """The folder of a stored result with this content key (``Result.key``, :func:`result_key`), if any.

    The content-keyed default folder ``<root>/<key>`` (where ``Result.save()`` writes) is checked first, without
    walking the store; otherwise every result under ``root`` is scanned (results saved to a chosen ``--out``).
    """
    base = Path(root) if root is not None else results_root()
    if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
        return None
    default = base / key
    if not default.is_symlink() and default.is_dir():
        man = _load_manifest(default)
        if man is not None and man.get("key") == key:
            return default
    df = list_results(base)
    hit = df[df["key"] == key]
    return Path(hit.iloc[-1]["path"]) if len(hit) else None
