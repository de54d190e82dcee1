"""More bad input, by class of failure: damaged model and data files, devices this machine lacks, unbounded
ranges, paths that are not regular files, malformed model configs, and options that select nothing.

Every CLI case must exit with status 2 and print exactly one line on stderr, ``error: ...`` with the expected
fragment, leave no traceback and leave the folder it ran in as it was. The cases fail while the command line is
parsed, before a model loads, or on a tiny random model saved to a folder once per module; the unbounded ones
(``--tokens 0:99999999``, ``--layers 0-99999999``, ``--threads 100000``) must fail in seconds, not minutes.
Python entry points (``load_model``, ``Probe.run``, ``Probe.to_tokens``, ``resolve_device``), the private compile
caches and the Ray session records are checked below the table.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tiny_models
from conftest import messages, run_cli

from analyses.core import store
from probes import DeviceError, InputError, ModelLoadError

LONG_LINE = "word " * 50_000  # 250 000 characters on one JSONL line


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: regular files by content hash, the rest (folders, the FIFO) by kind and mode."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = str(p.relative_to(root))
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else oct(st.st_mode)
    return out


def _model_variant(src: Path, dst: Path, edit) -> None:
    shutil.copytree(src, dst)
    cfg = dst / "config.json"
    if callable(edit):
        cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    else:
        cfg.write_text(edit)


def _workspace(ws: Path, tiny: Path) -> None:
    """The odd files and folders the cases name (relative to ``ws``)."""
    (ws / "user.txt").write_text("three years of work\n")
    (ws / "data.csv").write_text("text,label\nhello world,1\n")
    (ws / "long.jsonl").write_text(json.dumps({"text": LONG_LINE}) + "\n")
    (ws / "folder.jsonl").mkdir()
    os.mkfifo(ws / "fifo.jsonl")
    (ws / "empty.gguf").write_bytes(b"")
    (ws / "random.gguf").write_bytes(bytes(range(256)) * 16)
    (ws / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)  # the magic, then a cut header
    (ws / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\xfe" * 64)
    (ws / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    np.save(ws / "small.npy", np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    _model_variant(tiny, ws / "badjson", '{"model_type": "llama", "hidden_size": 64,,}')
    _model_variant(tiny, ws / "unknowntype", lambda c: {**c, "model_type": "frobnet"})
    _model_variant(tiny, ws / "neglayers", lambda c: {**c, "num_hidden_layers": -3})
    _model_variant(tiny, ws / "zerowidth", lambda c: {**c, "hidden_size": 0})
    for name in ("parquet", "arrays", "modellist"):
        store.write_result(ws / f"r-{name}", analysis="demo", model={"name": "m", "fingerprint": "f"}, config={}, input_hash="h",
                           tables={"main": pd.DataFrame({"a": [1, 2]})}, arrays={"x": torch.zeros(3)})
    (ws / "r-parquet" / "main.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    (ws / "r-arrays" / "arrays.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}xx")
    man = json.loads((ws / "r-modellist" / "manifest.json").read_text())
    (ws / "r-modellist" / "manifest.json").write_text(json.dumps({**man, "model": ["m", "f"]}))


@pytest.fixture
def ws(tmp_path, tiny_dir, monkeypatch):
    w = tmp_path / "ws"
    w.mkdir()
    _workspace(w, tiny_dir)
    monkeypatch.setenv("SONDE_RESULTS", str(w / "sonde-results"))
    monkeypatch.setenv("SONDE_CACHE", str(tmp_path / "cache"))  # GGUF conversions and compile caches stay out of ~/.cache
    monkeypatch.chdir(w)
    return w


HOOK = "blocks.0.hook_resid_post"
FEW_GPUS = torch.cuda.device_count() <= 3

# (id, argv with {ws} = the workspace and {tiny} = the tiny model folder, a fragment of the error line)
CASES = [
    # --- 3: raw library errors from damaged files, devices, ports
    ("gguf-empty", ["info", "-m", "{ws}/empty.gguf"], "is empty"),
    ("gguf-random-bytes", ["info", "-m", "{ws}/random.gguf"], "is not a GGUF file"),
    ("gguf-truncated", ["info", "-m", "{ws}/truncated.gguf"], "cannot read GGUF file"),
    ("device-mps", ["info", "-m", "{tiny}", "--device", "mps"], "mps"),
    ("device-cpu-7", ["info", "-m", "{tiny}", "--device", "cpu:7"], "cpu:7"),
    ("device-cpu-7-plan", ["plan", "sinks", "--device", "cpu:7"], "cpu:7"),
    pytest.param("device-cuda-3", ["info", "-m", "{tiny}", "--device", "cuda:3"], "cuda:3",
                 marks=pytest.mark.skipif(not FEW_GPUS, reason="this machine has a GPU 3")),
    ("device-nonsense", ["info", "-m", "{tiny}", "--device", "cuda:x"], "unknown device"),
    ("device-meta", ["info", "-m", "{tiny}", "--device", "meta"], "unknown device"),
    ("fiber-corrupt-safetensors", ["run", "fiber", "--matrix", "{ws}/corrupt.safetensors"], "corrupt.safetensors"),
    ("fiber-corrupt-npy", ["run", "fiber", "--matrix", "{ws}/corrupt.npy"], "corrupt.npy"),
    ("results-show-corrupt-parquet", ["results", "show", "{ws}/r-parquet"], "r-parquet"),
    ("results-show-corrupt-arrays", ["results", "show", "{ws}/r-arrays"], "r-arrays"),
    ("results-show-model-is-a-list", ["results", "show", "{ws}/r-modellist"], "'model' is a list"),
    ("sweep-empty-checkpoints", ["run", "sweep", "sinks", "--checkpoints", ""], "--checkpoints"),
    ("sweep-comma-checkpoints", ["run", "sweep", "sinks", "--checkpoints", " , "], "--checkpoints"),
    ("capture-out-on-dev-full", ["capture", "-m", "{tiny}", "-p", "hi", "--hooks", HOOK, "--out", "/dev/full/x.safetensors"],
     "cannot write"),
    ("dashboard-port-negative", ["dashboard", "--port", "-1"], "--port"),
    ("dashboard-port-too-big", ["dashboard", "--port", "70000"], "--port"),
    ("dashboard-host-unknown", ["dashboard", "--host", "not_a_host"], "not_a_host"),
    ("dashboard-host-not-here", ["dashboard", "--host", "192.0.2.1", "--port", "8599"], "cannot listen"),
    # --- 4: bounds checked before the work they bound
    ("sinks-threads-huge", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--threads", "100000"], "--threads"),
    ("routes-threads-huge", ["run", "routes", "-m", "{tiny}", "--domains", "prose", "--threads", "100000"], "--threads"),
    ("fiber-tokens-huge", ["run", "fiber", "-m", "{tiny}", "--tokens", "0:99999999"], "99999999"),
    ("fiber-tokens-past-vocabulary", ["run", "fiber", "-m", "{tiny}", "--tokens", "0:300"], "256 rows"),
    ("fiber-tokens-past-matrix", ["run", "fiber", "--matrix", "{ws}/small.npy", "--tokens", "0:41"], "40 rows"),
    ("fiber-tokens-negative", ["run", "fiber", "-m", "{tiny}", "--tokens", "5:-5:-1"], "negative"),
    ("fiber-tokens-zero-step", ["run", "fiber", "-m", "{tiny}", "--tokens", "0:10:0"], "0:10:0"),
    ("lens-layers-huge", ["run", "logit-lens", "-m", "{tiny}", "-p", "hi", "--layers", "0-99999999"], "99999999"),
    ("lens-layers-reversed", ["run", "logit-lens", "-m", "{tiny}", "-p", "hi", "--layers", "5-1"], "5-1"),
    ("lens-layers-repeated", ["run", "logit-lens", "-m", "{tiny}", "-p", "hi", "--layers", "0-1,1"], "repeats"),
    ("bigram-checkpoint-is-a-file", ["run", "bigram", "-m", "{tiny}", "--checkpoint", "{ws}/user.txt", "--steps", "2"], "user.txt"),
    ("bigram-checkpoint-under-a-file", ["run", "bigram", "-m", "{tiny}", "--checkpoint", "{ws}/user.txt/ck", "--steps", "2"],
     "not a writable folder"),
    # --- 7: say what a path is
    ("routes-input-fifo", ["run", "routes", "-m", "{tiny}", "-i", "{ws}/fifo.jsonl"], "FIFO"),
    ("routes-input-folder", ["run", "routes", "-m", "{tiny}", "-i", "{ws}/folder.jsonl"], "is a folder"),
    ("sinks-input-dev-null", ["run", "sinks", "-m", "{tiny}", "-i", "/dev/null"], "character device"),
    ("capture-input-fifo", ["capture", "-m", "{tiny}", "-i", "{ws}/fifo.jsonl", "--hooks", HOOK, "--out", "{ws}/a.safetensors"], "FIFO"),
    ("dormant-input-folder", ["run", "dormant", "-m", "{tiny}", "-i", "{ws}/folder.jsonl"], "is a folder"),
    ("sweep-input-dev-null", ["run", "sweep", "sinks", "--checkpoints", "{tiny}", "-i", "/dev/null"], "character device"),
    ("bigram-corpus-folder", ["run", "bigram", "-m", "{tiny}", "--corpus", "{ws}/folder.jsonl"], "is a folder"),
    ("bigram-corpus-dev-null", ["run", "bigram", "-m", "{tiny}", "--corpus", "/dev/null"], "character device"),
    ("bias-categories-fifo", ["run", "bias-sweep", "-m", "{tiny}", "--categories", "{ws}/fifo.jsonl"], "FIFO"),
    ("bias-categories-folder", ["run", "bias-sweep", "-m", "{tiny}", "--categories", "{ws}/folder.jsonl"], "is a folder"),
    ("model-config-malformed", ["info", "-m", "{ws}/badjson"], "malformed JSON"),
    ("model-config-unknown-type", ["info", "-m", "{ws}/unknowntype"], "'frobnet'"),
    ("model-config-negative-layers", ["info", "-m", "{ws}/neglayers"], "num_hidden_layers=-3"),
    ("model-config-zero-width", ["info", "-m", "{ws}/zerowidth"], "hidden_size=0"),
    ("lens-layers-empty", ["run", "logit-lens", "-m", "{tiny}", "-p", "hi", "--layers", ""], "--layers"),
    ("bigram-layers-empty", ["run", "bigram", "-m", "{tiny}", "--layers", ""], "--layers"),
    ("bigram-drop-without-layers", ["run", "bigram", "-m", "{tiny}", "--drop-other-layers"], "--drop-other-layers"),
    ("plan-new-tokens-negative", ["plan", "critical", "--new-tokens", "-1", "--device", "cpu"], "--new-tokens"),
    ("plan-chunk-mb-zero", ["plan", "routes", "--chunk-mb", "0", "--device", "cpu"], "--chunk-mb"),
    ("capture-hooks-empty", ["capture", "-m", "{tiny}", "-p", "hi", "--hooks", "", "--out", "{ws}/a.safetensors"], "--hooks"),
    ("sinks-input-csv", ["run", "sinks", "-m", "{tiny}", "-i", "{ws}/data.csv"], "CSV"),
    ("routes-input-csv", ["run", "routes", "-m", "{tiny}", "-i", "{ws}/data.csv"], "JSONL"),
    ("cdpo-adapters-missing", ["run", "cdpo", "-m", "{tiny}", "--adapters", "{ws}/no-such-folder", "--out", "{ws}/p"], "does not exist"),
    ("critical-adapters-not-adapters", ["run", "critical", "-m", "{tiny}", "--adapters", "{ws}/folder.jsonl"],
     "pos/adapter_config.json"),
]


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c.values[0] if hasattr(c, "marks") else c[0] for c in CASES])
def test_bad_input_is_one_line(name, argv, fragment, ws, tiny_dir, capsys):
    before = _snapshot(ws.parent)
    args = [a.replace("{ws}", str(ws)).replace("{tiny}", str(tiny_dir)) for a in argv]
    t0 = time.monotonic()
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    assert fragment in lines[0], lines[0]
    assert time.monotonic() - t0 < 60, "a bound was checked after the work it bounds"
    after = _snapshot(ws.parent)
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == \
        {k: v for k, v in before.items() if not k.startswith("cache")}  # nothing new, nothing changed


def test_the_table_covers_each_class():
    assert len(CASES) >= 50


# ----------------------------------------------------------------------------- the error line comes last, alone
def test_error_after_the_planner_line_is_last(ws, tiny_dir, capsys):
    code, _, err = run_cli(["run", "routes", "-m", str(tiny_dir), "--prompt", "hi there", "--position", "50"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and "position=50" in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1


def test_full_disk_while_writing_a_capture(ws, tiny_dir, capsys):
    """A write that fails half-way (here: a file-size limit, as a full file system would) is one line and leaves no file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        code, _, err = run_cli(["capture", "-m", str(tiny_dir), "-p", "hello there " * 8, "--hooks", HOOK,
                                "--out", str(ws / "acts.safetensors")], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    lines = messages(err)  # after the capture loop's progress lines: one error line, the last
    assert code == 2 and len(lines) == 1 and "cannot write the capture file" in lines[0], err
    assert err.strip().splitlines()[-1] == lines[0]
    assert not (ws / "acts.safetensors").exists() and not list(ws.glob(".acts.safetensors.*"))


def test_long_line_is_cut_to_max_tokens_without_tokenizing_it_all(ws, tiny_dir, capsys):
    t0 = time.monotonic()
    code, out, err = run_cli(["run", "routes", "-m", str(tiny_dir), "-i", str(ws / "long.jsonl"), "--max-tokens", "16",
                              "--out", str(ws / "routes")], capsys)
    assert code == 0, err
    assert "prompts: 1" in out and "skipped: 0" in out
    assert time.monotonic() - t0 < 60


def test_dashboard_serve_refuses_a_bad_port_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "dashboard.serve", "--server.port", "99999"], cwd=root, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "SONDE_NO_WARM": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: port 99999 is not a TCP port (1..65535)."], r.stderr


# ----------------------------------------------------------------------------- Python entry points
def test_load_model_takes_a_path(tiny_dir):
    from probes import load_model

    probe = load_model(Path(tiny_dir), device="cpu")
    assert probe.info.n_layers == 2 and probe.info.name == str(tiny_dir)


def test_damaged_model_files_are_model_load_errors(tmp_path):
    from probes import load_model

    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(tmp_path / "cut.gguf", device="cpu")
    with pytest.raises(ModelLoadError, match="is a folder"):
        (tmp_path / "dir.gguf").mkdir()
        load_model(str(tmp_path / "dir.gguf"), device="cpu")


@pytest.mark.parametrize("device,match", [("mps", "no MPS"), ("cpu:7", "one cpu device"), ("xpu", "not supported"),
                                          ("meta", "not supported"), ("cuda:x", "unknown device"), ("gpu", "unknown device")])
def test_devices_this_machine_lacks(device, match):
    from probes.loading import resolve_device

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError, match=match):
        resolve_device(device)
    assert resolve_device("cpu:0").type == "cpu" and resolve_device(" cpu ").type == "cpu"


@pytest.fixture(scope="module")
def probe():
    return tiny_models.probe("llama")


def test_run_takes_a_text_as_to_tokens_does(probe):
    text = "hello world"
    assert torch.equal(probe.run(text), probe.run(probe.to_tokens(text)))
    assert probe.run([104, 105]).shape == (1, 2, 256) and probe.run(np.array([[104, 105]])).shape == (1, 2, 256)


@pytest.mark.parametrize("bad", [b"hello", None, ["a", "b"], [1.5, 2.0], [[1, 2], [3]], [True, False], 3.0, [], {"a": 1},
                                 torch.tensor([0.5]), [300], [-1]])
def test_run_refuses_what_is_not_ids_or_text(probe, bad):
    with pytest.raises(InputError):
        probe.run(bad)


def test_to_tokens_bounds_the_work_on_a_huge_text(probe):
    huge = "word " * 2_000_000  # 10 million characters
    t0 = time.monotonic()
    with pytest.raises(InputError, match="more than 128 tokens"):
        probe.to_tokens(huge)
    cut = probe.to_tokens(huge, max_length=16, truncate=True)
    assert time.monotonic() - t0 < 5
    assert torch.equal(cut, probe.to_tokens("word " * 40, max_length=300)[:, :16])  # the same first tokens
    assert probe.to_tokens("hi", max_length=16, truncate=True).shape == (1, 2)
    with pytest.raises(InputError, match="at most 4"):
        probe.to_tokens("hello there", max_length=4)
    with pytest.raises(InputError):
        probe.to_tokens(b"bytes")


# ----------------------------------------------------------------------------- private caches
def test_compile_caches_are_private(tmp_path, monkeypatch):
    from probes.loading import use_private_compile_caches

    monkeypatch.setenv("SONDE_CACHE", str(tmp_path / "cache"))
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "")  # unset for the test; monkeypatch restores the caller's value
    base = use_private_compile_caches()
    assert base == tmp_path / "cache" / "compile" and stat.S_IMODE(base.stat().st_mode) == 0o700
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(base / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(base / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice stands
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    use_private_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "compile").mkdir(mode=0o777)
    os.chmod(shared / "compile", 0o777)
    monkeypatch.setenv("SONDE_CACHE", str(shared))
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    assert use_private_compile_caches() is None and os.environ["TRITON_CACHE_DIR"] == ""  # never a folder others can write


def test_a_probe_sets_the_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_CACHE", str(tmp_path / "cache"))
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "")
    tiny_models.probe("gpt2")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "cache"))


def test_ray_folder_is_private_and_short(tmp_path, monkeypatch):
    from analyses.core import ray_session

    short = tempfile.mkdtemp(prefix="sc", dir="/tmp")
    monkeypatch.setenv("SONDE_CACHE", short)
    try:
        d = ray_session.folder()
        assert d == Path(short) / "ray" and stat.S_IMODE(d.stat().st_mode) == 0o700
        assert ray_session.ray_temp_dir(d).parent == d
        os.chmod(d, 0o777)  # another user could plant files: refused
        with pytest.raises(InputError, match="not a private folder"):
            ray_session.folder()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    monkeypatch.setenv("SONDE_CACHE", str(tmp_path / ("x" * 60)))  # too long for Ray's socket paths
    d = ray_session.folder()
    assert len(str(d)) <= 42 and d.name == f"sonde-ray-{os.getuid()}" and stat.S_IMODE(d.stat().st_mode) == 0o700


def _orphan_sleeper() -> int:
    """A process this test starts that is not its child (as Ray's processes outlive a killed driver)."""
    out = subprocess.run(["sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_stale_ray_processes_of_a_killed_driver_are_stopped(tmp_path):
    import psutil

    from analyses.core import ray_session

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_start = psutil.Process(dead.pid).create_time()
    dead.wait()
    leftover, other = _orphan_sleeper(), _orphan_sleeper()
    try:
        ray_session.record(tmp_path, [leftover])
        mine = tmp_path / f"sonde-driver-{os.getpid()}.json"
        stale = tmp_path / f"sonde-driver-{dead.pid}.json"
        rec = json.loads(mine.read_text())
        stale.write_text(json.dumps({"driver": [dead.pid, dead_start], "processes": rec["processes"]}))
        # a live driver's record is left alone; a record whose start time does not match the process is not followed
        mine.write_text(json.dumps({"driver": rec["driver"], "processes": [[other, psutil.Process(other).create_time()]]}))
        (tmp_path / "sonde-driver-1.json").write_text(json.dumps({"driver": [1, 0.0], "processes": [[other, 1.0]]}))
        assert ray_session.stop_stale(tmp_path, wait=5) == [leftover]
        assert not psutil.pid_exists(leftover) or psutil.Process(leftover).status() == psutil.STATUS_ZOMBIE
        assert psutil.Process(other).is_running() and mine.exists() and not stale.exists()
        ray_session.forget(tmp_path)
        assert not mine.exists()
    finally:
        for p in (leftover, other):
            try:
                os.kill(p, 9)
            except OSError:
                pass
