"""Nothing lost, nothing unpickled: the one state format, kills inside a save, the result store's
refusals, damaged manifests, and a scan of the project code for unpickling calls."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.core import cluster, io, store
from analyses.core.io import Checkpoint, load_state, private_dir, read_state_header, save_state
from probes import InputError, Mean
from probes.errors import SondeWarning

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- the state format
def test_state_round_trip_and_fingerprint_first(tmp_path):
    x = torch.arange(6.0)
    tree = {"a": x, "view": x[:3], "mixed": [1, 2.5, float("nan"), None, "s", (1, 2)], "bf": torch.ones(2, dtype=torch.bfloat16),
            "int_keys": {0: {"step": torch.tensor(3.0)}, 7: "seven"}, "__kind__": "Mean", "lookalike": {"__tensor__": "t0"}}
    f = save_state(tmp_path / "s.safetensors", tree, fingerprint="fp", meta={"n_done": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temp file left
    got, meta = load_state(f, "fp")
    assert meta == {"n_done": 3} and got["int_keys"][7] == "seven" and torch.equal(got["int_keys"][0]["step"], torch.tensor(3.0))
    assert torch.equal(got["a"], x) and torch.equal(got["view"], x[:3]) and got["bf"].dtype == torch.bfloat16
    assert got["mixed"][:2] == [1, 2.5] and got["mixed"][2] != got["mixed"][2] and got["mixed"][3:] == [None, "s", (1, 2)]
    assert got["lookalike"] == {"__tensor__": "t0"} and got["__kind__"] == "Mean"
    assert load_state(f, "another run") is None
    # the fingerprint is read from the JSON header before any tensor: a file whose tensor bytes are
    # garbage is still recognised as "another run" without touching them
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    f.write_bytes(bytes(raw))
    assert read_state_header(f)["fingerprint"] == "fp" and load_state(f, "another run") is None
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a state")  # e.g. a planted pickle
    assert read_state_header(tmp_path / "junk.safetensors") is None and load_state(tmp_path / "junk.safetensors", "fp") is None
    with pytest.raises(TypeError, match="cannot save a object"):
        save_state(tmp_path / "bad.safetensors", {"x": object()}, fingerprint="fp")
    assert not (tmp_path / "bad.safetensors").exists()


def test_private_folders(tmp_path):
    p = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(p.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # another user could plant files here
    with pytest.raises(InputError, match="not a private folder"):
        private_dir(shared)
    (tmp_path / "link").symlink_to(p)
    with pytest.raises(InputError, match="not a private folder"):
        private_dir(tmp_path / "link")
    led = cluster.default_ledger(tmp_path / "out")
    assert tmp_path not in led.parents and led == cluster.default_ledger(tmp_path / "x" / ".." / "out")
    assert led.name.startswith("sweep-") and led.parent.name == "work"


def _forked(fn, env: dict[str, str]) -> int:
    """Run ``fn`` in a forked child with ``env`` set; returns its exit status (the kill hook exits 75)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.environ.update(env)
            io._SAVES[0] = 0
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


DATA = [torch.full((1, 3), float(i)) for i in range(10)]


def _checkpointed_run(folder: Path) -> Mean:
    """Fold the 10 items, saving every 2; resumes from the checkpoint."""
    r = Mean(dims=(0,))
    ck = Checkpoint(folder, fingerprint="run")
    done = ck.restore({"m": r})
    for i in range(done, 10):
        r.update(DATA[i])
        if (i + 1) % 2 == 0:
            ck.save(i + 1, {"m": r})
    return r


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("stage", ["write", "rename"])
def test_kill_inside_checkpoint_save_resumes_exactly(tmp_path, k, stage):
    """A process killed inside the k-th save (temp file written, not renamed / renamed, caller not yet
    back) resumes with every item counted once."""
    rc = _forked(lambda: _checkpointed_run(tmp_path / "ck"), {io.SAVE_FAULT_ENV: f"{k}:{stage}"})
    assert rc == 75
    assert all(not p.name.endswith(".tmp") for p in (tmp_path / "ck").iterdir()) or stage == "write"
    saved = read_state_header(tmp_path / "ck" / Checkpoint.FILE)
    n_saved = 2 * (k - 1 if stage == "write" else k)  # the kill lost no completed save
    assert (saved["meta"]["n_done"] if saved else 0) == n_saved
    r = _checkpointed_run(tmp_path / "ck")
    assert r.count == 10 and r.finalize().tolist() == [4.5, 4.5, 4.5]


def _ledger_run(folder: Path):
    """Shards finish out of order (1, 0, 3, 2): saves are shard 1, ledger 0-1, shard 3, ledger 2-3."""
    merge = lambda a, b: b if a is None else {"x": a["x"] + b["x"], "n": a["n"] + b["n"], "order": a["order"] + b["order"]}  # noqa: E731
    led = cluster.Ledger(folder, fingerprint="f", n_shards=4, merge=merge)
    led.load()
    for i in (1, 0, 3, 2):
        if i not in led.done:
            led.record(i, {"x": torch.tensor([float(i + 1)], dtype=torch.float64), "n": 1, "order": [i]}, {"attempts": 1})
    return led


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("stage", ["write", "rename"])
def test_kill_between_ledger_saves_counts_each_shard_once(tmp_path, k, stage):
    rc = _forked(lambda: _ledger_run(tmp_path / "L"), {io.SAVE_FAULT_ENV: f"{k}:{stage}"})
    assert rc == 75
    led = _ledger_run(tmp_path / "L")
    assert led.through == 4 and led.state["n"] == 4 and led.state["order"] == [0, 1, 2, 3]
    assert led.state["x"].tolist() == [10.0]
    assert sorted(p.name for p in (tmp_path / "L").iterdir() if not p.name.endswith(".tmp")) == ["ledger.safetensors"]


def test_sweep_fingerprint_covers_checkpoint_contents(tmp_path):
    from analyses.core import checkpoints

    ck = tmp_path / "step100"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes(b"weights one")
    cfg = checkpoints.Config(analysis="logit_lens", checkpoints=(str(ck),))
    a = checkpoints._fingerprint(cfg, None)
    assert checkpoints._fingerprint(cfg, None) == a
    (ck / "model.safetensors").write_bytes(b"weights two")  # retrained into the same folder name
    assert checkpoints._fingerprint(cfg, None) != a


# ----------------------------------------------------------------------------- the result store
def _write(out, *, replace=False, tables=None, key_cfg=1):
    return store.write_result(out, analysis="demo", model={"name": "m", "fingerprint": "f"}, config={"c": key_cfg}, input_hash="h",
                              tables=tables if tables is not None else {"main": pd.DataFrame({"a": [key_cfg]})}, replace=replace)


def test_write_result_never_loses_user_data(tmp_path):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "data.csv").write_text("a,b\n")
    (tmp_path / "file").write_text("keep me")
    before = tree_hash(tmp_path)
    with pytest.raises(InputError, match="non-empty folder that is not a Sonde result"):
        _write(user)
    with pytest.raises(InputError, match="non-empty folder that is not a Sonde result"):
        _write(user, replace=True)
    with pytest.raises(InputError, match="is a file"):
        _write(tmp_path / "file", replace=True)
    with pytest.raises(InputError, match="is not a folder"):
        _write(tmp_path / "file" / "r")
    with pytest.raises(InputError, match="not writable"):
        _write("/proc/sonde-test/r")
    assert tree_hash(tmp_path) == before  # nothing touched, nothing left

    (tmp_path / "empty").mkdir()
    assert store.read_result(_write(tmp_path / "empty")).tables["main"]["a"].tolist() == [1]  # an empty folder may be used
    r = _write(tmp_path / "deep" / "er" / "r")
    with pytest.raises(store.ResultExistsError, match="already holds a Sonde result.*--replace"):
        _write(r, key_cfg=2)
    assert store.read_result(r).config == {"c": 1}
    # a failing replacement leaves the old result as it was (and no temp folder)
    bad = pd.DataFrame({"a": [1, "x"]})  # pyarrow cannot write mixed types
    with pytest.raises(Exception):
        _write(r, replace=True, tables={"main": bad})
    assert store.read_result(r).config == {"c": 1}
    assert sorted(p.name for p in r.parent.iterdir()) == ["r"]
    _write(r, replace=True, key_cfg=2)
    assert store.read_result(r).config == {"c": 2} and sorted(p.name for p in r.parent.iterdir()) == ["r"]
    with store.replacing():  # the CLI's --replace
        _write(r, key_cfg=3)
    assert store.read_result(r).config == {"c": 3}
    # a failure leaves no parent folders behind either
    with pytest.raises(Exception):
        _write(tmp_path / "new1" / "new2" / "r", tables={"main": bad})
    assert not (tmp_path / "new1").exists()


def test_same_key_default_folder_is_a_recomputation(results_dir):
    key = store.result_key("demo", "f", {"c": 1}, "h")
    _write(results_dir / key)
    _write(results_dir / key)  # the same content key in its own folder: replaced without a flag
    with pytest.raises(store.ResultExistsError):
        _write(results_dir / key, key_cfg=2)


def test_damaged_manifests_and_table_names(tmp_path, recwarn):
    good = _write(tmp_path / "good")
    for name, text in (("list", "[1, 2]"), ("broken", "{not json"), ("noanalysis", '{"format": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        with pytest.raises(InputError, match="manifest"):
            store.read_manifest(tmp_path / name)
    with pytest.warns(SondeWarning, match="skipped") as w:
        df = store.list_results(tmp_path)
    assert df["path"].tolist() == [str(good)] and len(w) == 3
    assert all("\n" not in str(x.message) for x in w)
    for bad in ("../../x", "/etc/passwd", "a/b", "..", "x y", 3):
        m = json.loads((good / "manifest.json").read_text())
        m["tables"] = [bad]
        (good / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(InputError, match="not allowed"):
            store.read_result(good)


# ----------------------------------------------------------------------------- no pickle in project code
UNPICKLING = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcPickle\b|\bdill\b|\bcloudpickle\b|\bjoblib\.load\("), "pickle-based loader"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\bnp\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without allow_pickle=False"),
    (re.compile(r"\bnumpy\.load\((?![^)]*allow_pickle\s*=\s*False)"), "numpy.load without allow_pickle=False"),
    (re.compile(r"\bpd\.read_pickle\(|\bpandas\.read_pickle\("), "read_pickle"),
    (re.compile(r"\bshelve\.open\(|\bmarshal\.loads?\("), "shelve/marshal"),
]


def test_no_unpickling_in_project_code():
    hits = []
    for folder in ("probes", "analyses", "dashboard", "benchmarks"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for no, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                for pat, what in UNPICKLING:
                    if pat.search(code):
                        hits.append(f"{f.relative_to(ROOT)}:{no}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_scan_catches_what_it_should():
    bad = ["x = torch.load(p)", "torch.load(p, weights_only=False)", "pickle.load(f)", "np.load(f, allow_pickle=True)",
           "np.load(f)", "import cloudpickle", "joblib.load(f)", "pd.read_pickle(f)"]
    ok = ["torch.load(p, weights_only=True)", "np.load(f, allow_pickle=False)", "safetensors.torch.load_file(p)"]
    assert all(any(p.search(b) for p, _ in UNPICKLING) for b in bad)
    assert not any(p.search(o) for o in ok for p, _ in UNPICKLING)


def test_results_ls_skips_a_damaged_manifest_with_one_line(tmp_path, capsys):
    from conftest import run_cli

    _write(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("[1, 2]")
    code, out, err = run_cli(["results", "ls", str(tmp_path)], capsys)
    assert code == 0 and "good" in out and "bad" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and lines[0].endswith("; skipped.") and "bad" in lines[0]
