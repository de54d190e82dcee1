"""The results store: one folder per result, the same format for every analysis.

A result folder holds

* ``manifest.json``: analysis name, model (name, fingerprint, summary), config, input hash, library
  versions, device, timings, created-at, and the list of tables and arrays;
* ``<table>.parquet`` for each tidy table;
* ``arrays.safetensors`` with the result's arrays (no pickle anywhere).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place last,
so a killed process never leaves a folder that reads as complete. Results are keyed by content
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from probes.errors import InputError

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
]

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
FORMAT_VERSION = 1


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
) -> Path:
    """Write a result folder atomically and return its path.

    ``extra`` holds small JSON-able values (scalars, short lists, graphs as node-link dicts).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tables = dict(tables or {})
        arrays = {k: v.detach().cpu().contiguous() for k, v in (arrays or {}).items()}
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        if arrays:
            from safetensors.torch import save_file

            save_file({k: (v.to(torch.float32) if v.dtype == torch.bfloat16 else v) for k, v in arrays.items()}, str(tmp / ARRAYS))
        manifest = {
            "format": FORMAT_VERSION,
            "analysis": analysis,
            "key": result_key(analysis, str(model.get("fingerprint", "")), config, input_hash),
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise InputError(f"{str(p)!r} is not a Sonde result folder (no {MANIFEST}).", hint="`sonde results ls` lists saved results.")
    return json.loads((p / MANIFEST).read_text())


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
    tables = {name: pd.read_parquet(p / f"{name}.parquet") for name in man.get("tables", [])}
    arrays: dict[str, torch.Tensor] = {}
    if (p / ARRAYS).is_file():
        from safetensors.torch import load_file

        arrays = load_file(str(p / ARRAYS))
    return StoredResult(p, man, tables, arrays)


def list_results(root: str | Path | None = None) -> pd.DataFrame:
    """One row per complete result folder under ``root`` (temporary folders are skipped)."""
    root = Path(root) if root is not None else results_root()
    rows = []
    if root.is_dir():
        for d in sorted(root.rglob(MANIFEST)):
            folder = d.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            try:
                m = json.loads(d.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            rows.append({
                "path": str(folder), "analysis": m.get("analysis"), "model": m.get("model", {}).get("name"),
                "created_at": m.get("created_at"), "key": m.get("key"),
                "seconds": sum(v for v in m.get("timings", {}).values() if isinstance(v, (int, float))),
            })
    return pd.DataFrame(rows, columns=["path", "analysis", "model", "created_at", "key", "seconds"])


def find_result(key: str, root: str | Path | None = None) -> Path | None:
    """The folder of a stored result with this content key, if any."""
    df = list_results(root)
    hit = df[df["key"] == key]
    return Path(hit.iloc[-1]["path"]) if len(hit) else None
