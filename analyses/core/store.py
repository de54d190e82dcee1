"""The results store: one folder per result, the same format for every analysis.

A result folder holds

* ``manifest.json``: analysis name, model (name, fingerprint, summary), config, input hash, library
  versions, device, timings, created-at, the list of tables and arrays, and the files Sonde wrote
  into the folder (name, size, sha256) with a signature over format, key, analysis and file list;
* ``<table>.parquet`` for each tidy table;
* ``arrays.safetensors`` with the result's arrays (no pickle anywhere);
* ``user-files/``: files that were in the folder when the result was replaced and that Sonde did not
  write (kept, with their relative paths).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place last,
so a killed process never leaves a folder that reads as complete. Nothing that Sonde did not write
is ever deleted or overwritten: the destination must be new, an empty folder, or an existing Sonde
result (a folder whose manifest is signed and lists the files Sonde wrote, or a result of the first
format), and an existing result is replaced only when asked (``replace=True``, the CLI's
``--replace``) or when it holds the very same content key in its content-keyed default folder
(``<results root>/<key>``: a re-computation of the same thing). On a replacement every file of the
old folder that is not one of the old result's own files (unlisted, changed since it was written, or
any file beside a first-format manifest) moves to the new result's ``user-files/``. A folder whose
``manifest.json`` is not Sonde's (unsigned, or listing files outside the folder) is refused and left
as it is. The new result is written beside the old one first, then swapped in; the old one's files
are removed only once the new one is in place, and they survive any failure before that.

Temporary entries are named ``.<name>.tmp-<uid>-<host>-<pid>-<random>`` (``.old-`` for a result set
aside during a swap, ``.sonde-write-test-<uid>-<host>-<pid>-<random>`` for write tests); the next
write into the same folder removes those of this user on this machine whose process has ended
(:func:`clean_stale`), and never anything else.

Results are keyed by content (:func:`result_key`: analysis + model fingerprint + config + input
hash), so the CLI, notebooks and the dashboard find each other's results instead of recomputing them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
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
    "USER_FILES",
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
    "attach_file",
    "remove_result",
    "scratch_prefix",
    "clean_stale",
    "stored_bytes",
    "readable_bytes",
]

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
USER_FILES = "user-files"
#: 2: the manifest lists the files Sonde wrote (``files``: name -> size, sha256), the files kept from the
#: folder it replaced (``user_files``) and a ``signature``; 1: no file list (still read everywhere).
FORMAT_VERSION = 2


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


# ============================================================================ temporary entries
def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
_SCRATCH = re.compile(r"\.(?:(?P<name>.+)\.(?P<kind>tmp|old)|sonde-write-test)"
                      r"-(?P<uid>\d+)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[a-z0-9_]+(?:\.tmp)?")


def scratch_prefix(name: str, kind: str = "tmp") -> str:
    """The prefix of a temporary entry beside ``name`` (``tempfile`` adds the random part): it names this
    user, this machine and this process, so :func:`clean_stale` can tell a dead run's leftovers apart."""
    return f".{name}.{kind}-{_uid()}-{_HOST}-{os.getpid()}-"


def _write_test_prefix() -> str:
    return f".sonde-write-test-{_uid()}-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) is not a harmless probe: keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user has this id
        return True
    return True


def clean_stale(parent: str | Path) -> None:
    """Remove the temporary entries in ``parent`` left by runs of this user on this machine that have
    ended (killed mid-write): named by :func:`scratch_prefix` (or the write test), owned by this user,
    and whose process id is no longer running. A result set aside during a swap whose folder is gone
    is put back; files kept from a replaced folder (``user-files/``) go back to that folder, or stay
    where they are with one warning. Nothing else is touched."""
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        m = _SCRATCH.fullmatch(e.name)
        if m is None or int(m["uid"]) != _uid() or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            st = os.lstat(e.path)
            if st.st_uid != _uid():
                continue
            if stat.S_ISREG(st.st_mode):
                os.unlink(e.path)  # a partly written file (side file, state file)
            elif stat.S_ISDIR(st.st_mode):
                if m["name"] is None:
                    os.rmdir(e.path)  # a write test (always empty)
                else:
                    _recover(Path(e.path), parent / m["name"], m["kind"])
        except OSError:
            continue


def _recover(p: Path, dest: Path, kind: str) -> None:
    """A dead run's temporary result folder ``p`` beside its destination ``dest``."""
    if kind == "old" and not os.path.lexists(dest):  # killed between the two renames of a swap
        os.replace(p, dest)
        return
    clean_stale(p)  # the dead run's own temporary files inside it (a manifest being written)
    kept = p / USER_FILES
    if _real_dir(kept):
        if _real_dir(dest) and not os.path.lexists(dest / USER_FILES):
            os.rename(kept, dest / USER_FILES)  # the files of an interrupted replacement go back to their folder
    man, kind_ = _result_kind(p)
    if kind_ == "signed":
        ours = _own_files(p, man) | {MANIFEST}
    elif man is None and not (p / MANIFEST).exists():  # killed before the manifest: only tables and arrays so far
        ours = {e.name for e in os.scandir(p) if e.is_file(follow_symlinks=False) and (e.name.endswith(".parquet") or e.name == ARRAYS)}
    else:
        ours = set()
    left = _remove_ours(p, ours)
    if left:
        warnings.warn(SondeWarning(f"{str(p)!r} was left by an interrupted write of {str(dest)!r} and holds files Sonde "
                                   f"did not write ({', '.join(sorted(left)[:3])}); it was left as it is"), stacklevel=3)


def _real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _remove_ours(folder: Path, names: set[str]) -> list[str]:
    """Delete the top-level files ``names`` of ``folder`` (plain files only), then ``folder`` itself if
    that empties it; returns what is left (top-level names), which is never touched."""
    for n in names:
        f = folder / n
        try:
            if stat.S_ISREG(os.lstat(f).st_mode):
                os.unlink(f)
        except OSError:
            pass
    try:
        os.rmdir(folder)
        return []
    except OSError:
        try:
            return sorted(os.listdir(folder))
        except OSError:
            return []


# ============================================================================ recognising results
_KEY = re.compile(r"[0-9a-f]{16}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


def _load_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest as a JSON object with an ``analysis`` (enough to *read* it), else ``None``.
    Replacing or deleting asks more (:func:`_result_kind`)."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("analysis"), str) else None


def _signature(man: Mapping[str, Any]) -> str:
    body = {k: man.get(k) for k in ("format", "key", "analysis", "files", "user_files")}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"sonde-result\0" + blob.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": os.lstat(path).st_size, "sha256": _sha256(path)}


def _valid_key(man: Mapping[str, Any]) -> bool:
    key, analysis = man.get("key"), man.get("analysis")
    return (isinstance(key, str) and isinstance(analysis, str) and key.startswith(analysis + "-")
            and _KEY.fullmatch(key[len(analysis) + 1:]) is not None)


def _valid_files(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(n, str) and _FILE_NAME.fullmatch(n) and n not in (MANIFEST, USER_FILES) and ".." not in n
        and isinstance(r, dict) and type(r.get("size")) is int and r["size"] >= 0
        and isinstance(r.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", r["sha256"])
        for n, r in files.items())


def _valid_user_files(names: Any) -> bool:
    return isinstance(names, list) and all(
        isinstance(n, str) and n.startswith(USER_FILES + "/") and not os.path.isabs(n) and ".." not in n.split("/") for n in names)


def _result_kind(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, kind)``: ``"signed"`` for a result of this format (signature, key and file list all
    check out), ``"old"`` for a result of the first format (no file list: its key has the result form and
    its tables are there), ``None`` for anything else (no manifest, or one that Sonde did not write)."""
    man = _load_manifest(folder)
    if man is None or not _valid_key(man):
        return man, None
    fmt = man.get("format")
    if type(fmt) is int and fmt == FORMAT_VERSION:
        ok = (_valid_files(man.get("files")) and _valid_user_files(man.get("user_files", []))
              and man.get("signature") == _signature(man))
        return man, ("signed" if ok else None)
    if type(fmt) is int and fmt == 1:
        tables = man.get("tables")
        ok = (isinstance(tables, list) and all(isinstance(t, str) and _TABLE_NAME.fullmatch(t) and ".." not in t for t in tables)
              and all((folder / f"{t}.parquet").is_file() for t in tables) and isinstance(man.get("created_at"), str))
        return man, ("old" if ok else None)
    return man, None


def _own_files(folder: Path, man: Mapping[str, Any]) -> set[str]:
    """The files of a signed result that are still as Sonde wrote them (plain file, same size and sha256)."""
    out = set()
    for name, rec in man["files"].items():
        f = folder / name
        try:
            st = os.lstat(f)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == rec["size"] and _sha256(f) == rec["sha256"]:
            out.add(name)
    return out


def is_result(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a Sonde result (a signed manifest whose key and file list
    check out, or a result of the first format); a hand-written ``manifest.json`` is not one."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and _result_kind(p)[1] is not None


def _first_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_destination(out_dir: str | Path, *, replace: bool | None = None, key: str | None = None) -> Path:
    """Refuse, before any work, a result destination that would lose data or cannot be written.

    Allowed: a new path whose nearest existing ancestor is a writable folder, an empty folder, or a
    Sonde result when ``replace`` (or the same ``key`` in its content-keyed default folder). Refused
    with :class:`InputError` (:class:`ResultExistsError` for a result): a file, a non-empty folder
    that is not a Sonde result (a ``manifest.json`` Sonde did not write included), a link, an
    unwritable location.
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
            man, kind = _result_kind(out)
            if kind is None:
                why = " (its manifest.json was not written by Sonde)" if (out / MANIFEST).exists() else ""
                raise InputError(f"{str(out)!r} is a non-empty folder that is not a Sonde result{why}; refusing to write into it.",
                                 hint="Give a new or empty folder for --out.")
            same = key is not None and man.get("key") == key and out.name == key
            if not (replace or same):
                raise ResultExistsError(f"{str(out)!r} already holds a Sonde result ({man['analysis']}); not replacing it.",
                                        hint="Pass --replace (Python: replace=True) to replace it, or give another --out.")
            if os.path.lexists(out / USER_FILES) and not _real_dir(out / USER_FILES):
                raise InputError(f"{str(out / USER_FILES)!r} is not a folder; the files Sonde keeps on a replacement go there.",
                                 hint="Rename it, or give another --out.")
        base = out.parent
    else:
        base = _first_existing(out.parent)
        if not base.is_dir():
            raise InputError(f"cannot write {str(out)!r}: {str(base)!r} is not a folder.", hint="Give another --out.")
    try:  # a real write test (permissions, read-only file systems, quotas), removed at once
        probe = tempfile.mkdtemp(prefix=_write_test_prefix(), dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {str(base)!r} is not writable ({e.strerror or e}).",
                         hint="Give a writable --out.") from None
    return out


def results_root() -> Path:
    """The results store, one per user, shared by the CLI, notebooks and the dashboard from any folder:
    ``$SONDE_RESULTS``, else ``$XDG_DATA_HOME/sonde/results``, else ``~/.local/share/sonde/results``."""
    root = os.environ.get("SONDE_RESULTS")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "sonde" / "results"


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
    inputs: str = "",
) -> Path:
    """Write a result folder atomically and return its path.

    ``inputs`` is a readable summary of the inputs (a prompt's first characters, a file's name, a row count), kept
    in the manifest for ``sonde results ls``; the key comes from ``input_hash``.

    ``extra`` holds small JSON-able values (scalars, short lists, graphs as node-link dicts).
    ``out_dir`` must be new, an empty folder, or a Sonde result; an existing result is replaced only
    with ``replace=True`` (or inside :func:`replacing`), or when it is the same content key in its
    content-keyed folder. Otherwise :class:`InputError` (:class:`ResultExistsError`) and nothing is
    touched. Files of the old folder that Sonde did not write move to the new result's ``user-files/``;
    the old result's own files are removed only after the new one is in place.
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
        clean_stale(out_dir.parent)
        tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix(out_dir.name), dir=out_dir.parent))
        tables = dict(tables or {})
        arrays = {k: v.detach().cpu().contiguous() for k, v in (arrays or {}).items()}
        for name in tables:
            _check_table_name(name)
        for name, df in tables.items():
            # zstd: smaller than snappy and as fast to read; dictionaries for labels only (a float column's values
            # rarely repeat, and dictionary-encoding them made a table of 8.9M importances 19 % larger and 5x slower to write)
            df.to_parquet(tmp / f"{name}.parquet", index=False, compression="zstd",
                          use_dictionary=[str(c) for c, t in df.dtypes.items() if not pd.api.types.is_float_dtype(t)])
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
            **({"inputs": str(inputs)[:200]} if inputs else {}),  # absent when unknown (results written before it)
            "versions": library_versions(),
            "device": device or str(model.get("device", "cpu")),
            "timings": _jsonable(dict(timings or {})),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tables": sorted(tables),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in arrays.items()},
            "extra": _jsonable(dict(extra or {})),
            "files": {e.name: _file_record(Path(e.path)) for e in sorted(os.scandir(tmp), key=lambda e: e.name)},
            "user_files": [],
        }
        _publish(tmp, out_dir, manifest)
    except OSError as e:
        _cleanup(tmp, made)
        raise InputError(f"cannot write the result {str(out_dir)!r} ({e.strerror or e}).",
                         hint="Check the free space and permissions of --out.") from None
    except BaseException:
        _cleanup(tmp, made)
        raise
    return out_dir


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["signature"] = _signature(manifest)
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cleanup(tmp: Path | None, made: list[Path]) -> None:
    if tmp is not None and os.path.lexists(tmp):  # what this call wrote; kept files (user-files/) are never removed
        left = _remove_ours(tmp, {e.name for e in os.scandir(tmp) if e.is_file(follow_symlinks=False)})
        if left:
            warnings.warn(SondeWarning(f"files kept from the folder being replaced are in {str(tmp)!r}; move them back by hand"),
                          stacklevel=3)
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


def _free_name(folder: Path, name: str) -> Path:
    p, n = folder / name, 2
    while os.path.lexists(p):
        p, n = folder / f"{name}~{n}", n + 1
    return p


def _gather_user_files(out_dir: Path, ours: set[str]) -> list[tuple[Path, Path]]:
    """Move every top-level entry of ``out_dir`` that is not one of ``ours`` (and not ``user-files/``)
    into ``out_dir/user-files/`` (relative paths kept below it); returns the moves."""
    kept = out_dir / USER_FILES
    moves: list[tuple[Path, Path]] = []
    for e in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if e.name in ours or (e.name == USER_FILES and _real_dir(kept)):
            continue
        if not os.path.lexists(kept):
            os.mkdir(kept)
        dst = _free_name(kept, e.name)
        os.rename(e.path, dst)
        moves.append((Path(e.path), dst))
    return moves


def _undo_moves(out_dir: Path, tmp: Path, moves: list[tuple[Path, Path]], created: bool, copied: Path | None) -> None:
    """Put back what :func:`_publish` moved before a failed swap (best effort; nothing is deleted but its own copy)."""
    kept = out_dir / USER_FILES
    try:
        if _real_dir(tmp / USER_FILES) and not os.path.lexists(kept):
            os.rename(tmp / USER_FILES, kept)
        for src, dst in reversed(moves):
            if not os.path.lexists(src):
                os.rename(dst, src)
        if copied is not None:
            copied.unlink(missing_ok=True)
        if created:
            os.rmdir(kept)
    except OSError:
        pass


def _publish(tmp: Path, out_dir: Path, manifest: dict[str, Any]) -> None:
    """Move the finished temp folder to ``out_dir``, writing its signed manifest last.

    An existing result's other files (not Sonde's, or changed since) first move to ``user-files/``,
    which then moves into the new result; the two folders are swapped in one atomic exchange where the
    system has one (else the old one is set aside by a rename and put back if the second rename fails);
    the old result's own files are removed only after the new one is in place. Any failure before the
    swap puts the moved files back where they were."""
    if not (os.path.lexists(out_dir) and (not out_dir.is_dir() or any(os.scandir(out_dir)))):
        _write_manifest(tmp, manifest)
        os.replace(tmp, out_dir)  # new, or an empty folder (rename(2) replaces an empty directory)
        return
    man, kind = _result_kind(out_dir) if not out_dir.is_symlink() else (None, None)
    if kind is None:  # changed since the check: never touch it
        raise InputError(f"{str(out_dir)!r} is no longer empty or a Sonde result; refusing to replace it.",
                         hint="Give a new folder for --out.")
    # a first-format result lists no files: everything beside its manifest is kept, and the manifest as a copy
    ours = (_own_files(out_dir, man) if kind == "signed" else set()) | {MANIFEST}
    kept = out_dir / USER_FILES
    created, copied, moves = not os.path.lexists(kept), None, []
    try:
        if kind == "old":
            os.makedirs(kept, exist_ok=True)
            copied = _free_name(kept, MANIFEST)
            shutil.copy2(out_dir / MANIFEST, copied)
        moves = _gather_user_files(out_dir, ours)
        if _real_dir(out_dir / USER_FILES):
            os.rename(out_dir / USER_FILES, tmp / USER_FILES)
            manifest["user_files"] = sorted(
                os.path.relpath(os.path.join(d, f), tmp).replace(os.sep, "/")
                for d, dirs, files in os.walk(tmp / USER_FILES)
                for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))])
        _write_manifest(tmp, manifest)
        if _exchange(tmp, out_dir):
            old = tmp  # tmp now holds the old result
        else:
            old = Path(tempfile.mkdtemp(prefix=scratch_prefix(out_dir.name, "old"), dir=out_dir.parent))
            os.rmdir(old)
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
    except BaseException:
        _undo_moves(out_dir, tmp, moves, created, copied)
        raise
    left = _remove_ours(old, ours)
    if left:  # something appeared in the old folder meanwhile: it is not Sonde's, so it stays
        warnings.warn(SondeWarning(f"{str(old)!r} (the replaced result) holds files Sonde did not write "
                                   f"({', '.join(sorted(left)[:3])}); it was left as it is"), stacklevel=3)


def attach_file(result_dir: str | Path, name: str, data: bytes) -> Path:
    """Write one more file (e.g. ``sweep.json``) into a saved result and list it in the signed manifest,
    so a replacement knows it as Sonde's. The file is written atomically; an existing file of that name
    is overwritten only when it is one Sonde wrote there."""
    folder = Path(result_dir)
    man, kind = _result_kind(folder) if _real_dir(folder) else (None, None)
    if kind != "signed":
        raise InputError(f"{str(folder)!r} is not a Sonde result of this version; not adding {name} to it.",
                         hint="Save the result first (result.save(...)).")
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (MANIFEST, USER_FILES) or ".." in name:
        raise InputError(f"file name {name!r} is not allowed in a result folder.")
    target = folder / name
    if os.path.lexists(target) and name not in _own_files(folder, man):
        raise InputError(f"{str(target)!r} exists and is not a file Sonde wrote; refusing to overwrite it.")
    clean_stale(folder)
    _atomic_write(target, bytes(data))
    man = dict(man)
    man["files"] = {**man["files"], name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    _write_manifest(folder, man)
    return target


def remove_result(result_dir: str | Path) -> list[str]:
    """Remove a Sonde result: its manifest and the files it lists that are still as Sonde wrote them,
    then the folder if that leaves it empty. Everything else (``user-files/``, anything added or changed
    since) stays; returns what was left. A folder that is not a signed Sonde result is refused."""
    folder = Path(result_dir)
    man, kind = _result_kind(folder) if _real_dir(folder) else (None, None)
    if kind != "signed":
        raise InputError(f"{str(folder)!r} is not a Sonde result of this version; not removing anything.")
    return _remove_ours(folder, _own_files(folder, man) | {MANIFEST})


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


def stored_bytes(folder: str | Path) -> int:
    """The bytes a result folder takes on disk: its plain files, at any depth (links are not followed)."""
    return sum(e.stat().st_size for e in Path(folder).rglob("*") if e.is_file() and not e.is_symlink())


def readable_bytes(n: int) -> str:
    """A byte count for people: ``"812 bytes"``, ``"2.3 MB"`` (powers of 1000)."""
    x = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:,.0f} {unit}" if unit == "bytes" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def list_results(root: str | Path | None = None) -> pd.DataFrame:
    """One row per complete result folder under ``root`` (temporary folders and the files a result keeps
    in its ``user-files/`` are skipped; a damaged manifest is skipped with one
    :class:`probes.errors.SondeWarning`)."""
    root = Path(root) if root is not None else results_root()
    rows = []
    if root.is_dir():
        for d in sorted(root.rglob(MANIFEST)):
            folder = d.parent
            parts = folder.relative_to(root).parts
            if any(part.startswith(".") for part in parts):
                continue
            if any(part == USER_FILES and (root.joinpath(*parts[:i]) / MANIFEST).is_file() for i, part in enumerate(parts)):
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
                "inputs": m.get("inputs") if isinstance(m.get("inputs"), str) else "",
                "created_at": m.get("created_at"), "key": m.get("key"),
                "seconds": sum(v for v in timings.values() if isinstance(v, (int, float))),
            })
    return pd.DataFrame(rows, columns=["path", "analysis", "model", "inputs", "created_at", "key", "seconds"])


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
