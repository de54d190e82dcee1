"""Sonde never deletes what it did not write, checks resume state before using it, and leaves nothing behind.

* result folders: a signed manifest lists the files Sonde wrote; a replacement keeps every other file
  (``user-files/``), a hand-written ``manifest.json`` is refused and left as it is;
* temporary entries are named by user, machine and process; the next write removes those of dead runs only;
* resume ledgers (``io.Checkpoint``, ``cluster.Ledger``) with altered progress are never used silently;
* a failed export (``--html``, ``--graphml``) leaves no result, and a refused checkpoint sweep no work folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.core import cluster, io, store
from probes import InputError, Mean
from probes.errors import SondeWarning

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): ("link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                                       else "dir") for p in sorted(root.rglob("*"))}


def _write(out, *, c=1, replace=False, tables=None):
    return store.write_result(out, analysis="demo", model={"name": "m", "fingerprint": "f"}, config={"c": c}, input_hash="h",
                              tables=tables if tables is not None else {"main": pd.DataFrame({"a": [c]})}, replace=replace)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- what a result is
def test_manifest_lists_and_signs_the_files_sonde_wrote(tmp_path):
    r = _write(tmp_path / "r")
    man = json.loads((r / "manifest.json").read_text())
    assert man["format"] == store.FORMAT_VERSION == 2 and man["user_files"] == []
    assert man["files"] == {"main.parquet": {"size": (r / "main.parquet").stat().st_size,
                                             "sha256": hashlib.sha256((r / "main.parquet").read_bytes()).hexdigest()}}
    assert man["signature"] == store._signature(man) and store.is_result(r)
    forged = dict(man, files={**man["files"], "notes.txt": {"size": 1, "sha256": "0" * 64}})
    assert store._signature(forged) != man["signature"]  # the signature covers the file list


@pytest.mark.parametrize("manifest", [
    {"analysis": "x"},                                           # hand-written look-alike
    {"analysis": "demo", "format": 1, "key": "demo-0123456789abcdef", "tables": ["main"], "created_at": "now"},  # tables absent
    {"analysis": "demo", "format": 2, "key": "demo-0123456789abcdef", "files": {}, "user_files": [], "signature": "0" * 64},
    {"analysis": "demo", "format": 2, "key": "not-a-key", "files": {}, "user_files": []},
    {"analysis": "demo", "format": 2, "key": "demo-0123456789abcdef", "files": {"../notes.txt": {"size": 5, "sha256": "0" * 64}},
     "user_files": []},                                          # signed, but lists a file outside the folder
])
def test_lookalike_manifest_is_refused_and_left_untouched(tmp_path, manifest):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("my notes")
    if "files" in manifest and manifest.get("key") != "not-a-key" and manifest["files"]:
        manifest["signature"] = store._signature(manifest)  # a correct signature does not make outside files Sonde's
    (proj / "manifest.json").write_text(json.dumps(manifest))
    before = tree_hash(tmp_path)
    assert not store.is_result(proj)
    for replace in (False, True):
        with pytest.raises(InputError, match="non-empty folder that is not a Sonde result.*not written by Sonde") as e:
            _write(proj, replace=replace)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not a Sonde result"):
        store.remove_result(proj)
    with pytest.raises(InputError, match="not a Sonde result"):
        store.attach_file(proj, "sweep.json", b"{}")
    assert tree_hash(tmp_path) == before


def test_replace_keeps_the_users_files(tmp_path):
    r = _write(tmp_path / "r")
    (r / "my_notes.txt").write_text("remember: layer 5")
    (r / "sub" / "deeper").mkdir(parents=True)
    (r / "sub" / "deeper" / "data.csv").write_bytes(b"a,b\n1,2\n")
    (r / "empty").mkdir()
    (r / "link").symlink_to("my_notes.txt")
    user = {k: v for k, v in tree_hash(r).items() if k not in ("main.parquet", "manifest.json")}
    _write(r, c=2, replace=True)
    assert store.read_result(r).config == {"c": 2}
    kept = {k.removeprefix("user-files/"): v for k, v in tree_hash(r).items() if k.startswith("user-files/")}
    assert kept == user  # byte-identical, relative paths kept, empty folder and link too
    man = json.loads((r / "manifest.json").read_text())
    assert man["user_files"] == ["user-files/link", "user-files/my_notes.txt", "user-files/sub/deeper/data.csv"]
    assert store.is_result(r)
    # a second replacement keeps them again, in the same place (no user-files/user-files)
    (r / "late.txt").write_text("added after the first replacement")
    (r / "main.parquet").write_bytes(b"the user edited the table")  # no longer what Sonde wrote: kept too
    _write(r, c=3, replace=True)
    got = tree_hash(r)
    assert {k.removeprefix("user-files/"): v for k, v in got.items() if k.startswith("user-files/")} == {
        **user, "late.txt": hashlib.sha256(b"added after the first replacement").hexdigest(),
        "main.parquet": hashlib.sha256(b"the user edited the table").hexdigest()}
    assert store.read_result(r).config == {"c": 3} and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert store.list_results(tmp_path)["path"].tolist() == [str(r)]  # kept files are not results
    # removing a result removes Sonde's files only
    left = store.remove_result(r)
    assert sorted(p.name for p in r.iterdir()) == ["user-files"] and left
    assert {k.removeprefix("user-files/") for k in tree_hash(r) if k.startswith("user-files/")} >= set(user)


def test_same_key_recomputation_keeps_user_files_too(results_dir):
    key = store.result_key("demo", "f", {"c": 1}, "h")
    r = _write(results_dir / key)
    (r / "notes.txt").write_text("mine")
    _write(results_dir / key)  # no --replace needed for the same content key in its own folder
    assert (r / "user-files" / "notes.txt").read_text() == "mine"


def test_first_format_results_still_load_and_lose_nothing_on_replace(tmp_path):
    """A result written before manifests listed their files: read as before; a replacement keeps every
    file beside its manifest (and a copy of the manifest), since nothing proves which ones Sonde wrote."""
    old = tmp_path / "old"
    old.mkdir()
    pd.DataFrame({"a": [7]}).to_parquet(old / "main.parquet", index=False)
    man = {"format": 1, "analysis": "demo", "key": store.result_key("demo", "f", {"c": 0}, "h"), "model": {"name": "m"},
           "config": {"c": 0}, "input_hash": "h", "created_at": "2024-01-01T00:00:00+00:00", "tables": ["main"], "arrays": {},
           "extra": {}}
    (old / "manifest.json").write_text(json.dumps(man))
    (old / "notes.txt").write_text("kept")
    assert store.read_result(old).tables["main"]["a"].tolist() == [7] and store.is_result(old)
    assert store.list_results(tmp_path)["path"].tolist() == [str(old)]
    before = tree_hash(old)
    with pytest.raises(store.ResultExistsError):
        _write(old)
    _write(old, replace=True)
    after = tree_hash(old)
    assert {f"user-files/{k}": v for k, v in before.items()} == {k: v for k, v in after.items() if k.startswith("user-files/")}
    assert store.read_result(old).config == {"c": 1} and store.list_results(tmp_path)["path"].tolist() == [str(old)]


def test_result_load_reads_first_format(tmp_path):
    from test_store_io import _DemoResult, _demo

    out = _demo().save(tmp_path / "r")
    man = json.loads((out / "manifest.json").read_text())
    for k in ("files", "user_files", "signature"):
        del man[k]
    man["format"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    back = _DemoResult.load(out)
    assert back.labels == ("p", "q") and torch.equal(back.x, torch.tensor([1.0, 2.0]))


def test_attached_files_are_sondes(tmp_path):
    r = _write(tmp_path / "r")
    store.attach_file(r, "sweep.json", b'{"n_shards": 2}')
    store.attach_file(r, "sweep.json", b'{"n_shards": 3}')  # its own file: may be rewritten
    assert json.loads((r / "sweep.json").read_text()) == {"n_shards": 3} and store.is_result(r)
    (r / "mine.json").write_text("{}")
    with pytest.raises(InputError, match="not a file Sonde wrote"):
        store.attach_file(r, "mine.json", b"[]")
    with pytest.raises(InputError, match="not allowed"):
        store.attach_file(r, "../x.json", b"[]")
    _write(r, c=2, replace=True)
    assert sorted(p.name for p in r.iterdir()) == ["main.parquet", "manifest.json", "user-files"]
    assert sorted(p.name for p in (r / "user-files").iterdir()) == ["mine.json"]  # sweep.json was Sonde's: gone


def test_user_files_that_is_not_a_folder_is_refused(tmp_path):
    r = _write(tmp_path / "r")
    (r / "user-files").write_text("a file by that name")
    before = tree_hash(tmp_path)
    with pytest.raises(InputError, match="user-files.*is not a folder"):
        _write(r, c=2, replace=True)
    assert tree_hash(tmp_path) == before


# ----------------------------------------------------------------------------- interrupted writes
_DIE_IN_SWAP = textwrap.dedent("""
    import os, pandas as pd
    from analyses.core import store
    store._exchange = lambda a, b: os._exit(9)   # killed right before the swap: user files sit in the new folder
""")


def test_kill_before_the_swap_loses_no_user_file(tmp_path):
    r = _write(tmp_path / "r")
    (r / "notes.txt").write_text("mine")
    (r / "sub").mkdir()
    (r / "sub" / "a.csv").write_text("1")
    code = _DIE_IN_SWAP + textwrap.dedent(f"""
        store.write_result({str(r)!r}, analysis='demo', model={{'name': 'm', 'fingerprint': 'f'}}, config={{'c': 2}},
                           input_hash='h', tables={{'main': pd.DataFrame({{'a': [2]}})}}, replace=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 9
    stale = [x for x in tmp_path.iterdir() if x.name.startswith(".r.tmp-")]
    assert len(stale) == 1 and (stale[0] / "user-files" / "notes.txt").read_text() == "mine"
    assert store.read_result(r).config == {"c": 1}  # the old result is still whole
    _write(tmp_path / "other")  # the next write into the folder clears the dead run's folder, files go back
    assert sorted(x.name for x in tmp_path.iterdir()) == ["other", "r"]
    assert (r / "user-files" / "notes.txt").read_text() == "mine" and (r / "user-files" / "sub" / "a.csv").read_text() == "1"
    _write(r, c=3, replace=True)
    assert (r / "user-files" / "notes.txt").read_text() == "mine" and store.read_result(r).config == {"c": 3}


def test_stale_temporary_entries_of_dead_runs_only_are_removed(tmp_path):
    dead, uid, host = _dead_pid(), os.getuid(), store._HOST
    r = _write(tmp_path / "r")
    stale_tmp = tmp_path / f".r.tmp-{uid}-{host}-{dead}-abc123"
    stale_tmp.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(stale_tmp / "main.parquet")
    stale_test = tmp_path / f".sonde-write-test-{uid}-{host}-{dead}-x1"
    stale_test.mkdir()
    stale_side = tmp_path / f".page.html.tmp-{uid}-{host}-{dead}-q9z.tmp"
    stale_side.write_text("<html>half")
    set_aside = tmp_path / f".gone.old-{uid}-{host}-{dead}-k2"  # a result set aside by a swap that never finished
    _write(set_aside)
    keep = {
        f".r.tmp-{uid}-{host}-{os.getpid()}-live1": "this process is alive",
        f".r.tmp-{uid + 1}-{host}-{dead}-other": "another user's",
        f".r.tmp-{uid}-000000-{dead}-elsewhere": "another machine's",
        ".r.tmp-notes": "not Sonde's naming",
        f"r.tmp-{uid}-{host}-{dead}-visible": "not hidden: the user's",
    }
    for name, text in keep.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    before = {k: v for k, v in tree_hash(tmp_path).items() if k.split("/")[0] in keep}
    _write(tmp_path / "new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["gone", "new", "r", *keep]), names
    assert {k: v for k, v in tree_hash(tmp_path).items() if k.split("/")[0] in keep} == before
    assert store.read_result(tmp_path / "gone").config == {"c": 1}  # put back, not deleted


def test_side_file_and_state_temps_are_named_and_cleared(tmp_path):
    from analyses.cli.common import write_side_file

    dead = _dead_pid()
    stale = tmp_path / f".out.html.tmp-{os.getuid()}-{store._HOST}-{dead}-abc.tmp"
    stale.write_text("half")
    seen = []
    write_side_file(tmp_path / "out.html", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text("<html>")))
    assert seen[0].startswith(store.scratch_prefix("out.html"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html"]
    stale_state = tmp_path / f".s.safetensors.tmp-{os.getuid()}-{store._HOST}-{dead}-xyz.tmp"
    stale_state.write_bytes(b"half a state")
    io.save_state(tmp_path / "s.safetensors", {"x": torch.ones(2)}, fingerprint="fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "s.safetensors"]


# ----------------------------------------------------------------------------- resume state is checked before use
def _rewrite(path: Path, fingerprint: str, **changes) -> None:
    """Save the state again through the ordinary writer with some header (meta) values changed: the file's
    digest is then intact, only the progress it claims differs from the state it holds."""
    tree, meta = io.load_state(path, fingerprint)
    io.save_state(path, tree, fingerprint=fingerprint, meta={**meta, **changes})


def _rewrite_both(path: Path, fingerprint: str, **changes) -> None:
    """Save the state again with progress values changed alike in the header and beside the states."""
    tree, meta = io.load_state(path, fingerprint)
    tree["progress"] = {**tree["progress"], **changes}
    io.save_state(path, tree, fingerprint=fingerprint, meta=tree["progress"])


def _edit_header(path: Path, **changes) -> None:
    """Change meta values in the JSON header of a state file by hand (the digest is left as it was)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    info = json.loads(head["__metadata__"]["sonde.state"])
    info["meta"].update(changes)
    head["__metadata__"]["sonde.state"] = json.dumps(info)
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


DATA = [torch.full((1, 3), float(i)) for i in range(10)]
RECORDS = [io.Record(text=t, domain=d) for t, d in (("The cat sat on the mat.", "prose"), ("x = 1 + 2", "code"),
                                                   ("A dog ran far away.", "prose"), ("def f(a): return a", "code"),
                                                   ("Rain fell all day long.", "prose"), ("for i in range(3): pass", "code"))]
BAD_COUNTS = [3, 9, 10, 11, 10 ** 18, -1, "6", 6.0, True, None, [6]]


def _mean_run(folder: Path, stop: int | None = None) -> tuple[Mean, int]:
    """Fold the 10 items into a Mean, saving every 2 items; resumes from the checkpoint; ``stop`` ends early."""
    r = Mean(dims=(0,))
    ck = io.Checkpoint(folder, fingerprint="run", n_items=len(DATA))
    done = ck.restore({"m": r})
    for i in range(done, stop or len(DATA)):
        r.update(DATA[i])
        if (i + 1) % 2 == 0:
            ck.save(i + 1, {"m": r}, extra={"skipped": 0})
    return r, done


@pytest.mark.parametrize("how", ["rewrite", "header"])
@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
def test_checkpoint_with_altered_n_done_starts_over(tmp_path, how, bad):
    clean, _ = _mean_run(tmp_path / "clean")
    _mean_run(tmp_path / "ck", stop=6)  # interrupted after 6 items
    f = tmp_path / "ck" / io.Checkpoint.FILE
    (_rewrite(f, "run", n_done=bad) if how == "rewrite" else _edit_header(f, n_done=bad))
    with pytest.warns(SondeWarning) as w:
        r, done = _mean_run(tmp_path / "ck")
    msgs = [str(x.message) for x in w if issubclass(x.category, SondeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "starting over" in msgs[0], msgs
    assert done == 0 and r.count == clean.count == 10 and torch.equal(r.finalize(), clean.finalize())


def test_checkpoint_checks_inputs_counts_and_reducers(tmp_path):
    _mean_run(tmp_path / "ck", stop=6)
    f = tmp_path / "ck" / io.Checkpoint.FILE
    assert io.Checkpoint(tmp_path / "ck", fingerprint="run", n_items=10).restore({"m": Mean(dims=(0,))}) == 6  # intact: used
    with pytest.warns(SondeWarning, match="made for 10 inputs, this run has 8"):
        assert io.Checkpoint(tmp_path / "ck", fingerprint="run", n_items=8).restore({"m": Mean(dims=(0,))}) == 0
    with pytest.warns(SondeWarning, match="is a 'Mean', this run has a Sum"):
        from probes.reducers import Sum

        assert io.Checkpoint(tmp_path / "ck", fingerprint="run", n_items=10).restore({"m": Sum(dims=(0,))}) == 0
    for k, bad in enumerate((7, -1, "0", 2.5)):
        _mean_run(tmp_path / f"ck{k}", stop=6)
        _rewrite_both(tmp_path / f"ck{k}" / io.Checkpoint.FILE, "run", extra={"skipped": bad})
        with pytest.warns(SondeWarning, match="skipped=.* is not a count"):
            assert io.Checkpoint(tmp_path / f"ck{k}", fingerprint="run", n_items=10).restore({"m": Mean(dims=(0,))}) == 0
    # a tensor byte changed on disk: the digest no longer matches
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.warns(SondeWarning, match="do not match its digest"):
        assert io.Checkpoint(tmp_path / "ck", fingerprint="run", n_items=10).restore({"m": Mean(dims=(0,))}) == 0


def test_routes_checkpoint_with_altered_progress_gives_the_clean_numbers(tmp_path, tiny):
    from analyses import routes

    probe = tiny("llama")
    recs = RECORDS
    cfg = routes.DatasetConfig(max_tokens=16, checkpoint_every=2)
    clean = routes.run_dataset(probe, recs, config=cfg)

    def stops_after(n):
        for i, r in enumerate(recs):
            if i == n:
                raise KeyboardInterrupt
            yield r

    cases = [(_rewrite, 6, 0, "header and its contents disagree"), (_rewrite, "4", 0, "disagree"),
             (_rewrite_both, 6, 0, "holds 4 updates and skipped=0, not n_done=6"),  # would skip prompts 5 and 6
             (_rewrite_both, 2, 0, "holds 4 updates and skipped=0, not n_done=2"),  # would count prompts 3 and 4 twice
             (_rewrite_both, 4, 1, "holds 4 updates and skipped=1, not n_done=4"),
             (_rewrite_both, 7, 0, "n_done=7 exceeds the 6 inputs"), (_rewrite_both, 10 ** 18, 0, "exceeds"),
             (_rewrite_both, "4", 0, "n_done='4' is not a count")]
    for k, (rewrite, n_done, skipped, why) in enumerate(cases):
        ck = io.Checkpoint(tmp_path / f"ck{k}", fingerprint="routes-run", n_items=len(recs), exact_counts=True)
        with pytest.raises(KeyboardInterrupt):
            routes.run_dataset(probe, stops_after(5), config=cfg, checkpoint=ck)
        assert io.read_state_header(ck.folder / ck.FILE)["meta"]["n_done"] == 4
        rewrite(ck.folder / ck.FILE, "routes-run", n_done=n_done, extra={"skipped": skipped})
        with pytest.warns(SondeWarning, match=f"{why}.*starting over"):
            res = routes.run_dataset(probe, recs, config=cfg, checkpoint=ck)
        assert res.n.tolist() == clean.n.tolist() == [3.0, 3.0] and res.n_skipped == clean.n_skipped
        assert torch.equal(res.head_freq, clean.head_freq) and torch.equal(res.ffn_mean, clean.ffn_mean)


def _counting_merge(a, b):
    return dict(b) if a is None else {"x": a["x"] + b["x"], "n_texts": a["n_texts"] + b["n_texts"], "order": a["order"] + b["order"]}


def _ledger(folder, sizes=(2, 2, 2, 2)):
    return cluster.Ledger(folder, fingerprint="f", n_shards=len(sizes), merge=_counting_merge, sizes=list(sizes),
                          count=lambda st: st["n_texts"])


def _shard(i, size=2):
    return {"x": torch.tensor([float(i + 1)], dtype=torch.float64), "n_texts": size, "order": [i]}


def _finish(led):
    for i in range(led.n_shards):
        if i not in led.done:
            led.record(i, _shard(i), {"attempts": 1})
    return led


@pytest.mark.parametrize("how", ["rewrite", "header"])
@pytest.mark.parametrize("bad", [1, 3, 4, 5, 10 ** 18, 0, -1, "2", 2.0, True, None], ids=repr)
def test_ledger_with_altered_through_starts_over(tmp_path, how, bad):
    led = _ledger(tmp_path / "L")
    led.record(0, _shard(0), {"attempts": 1})
    led.record(1, _shard(1), {"attempts": 1})
    led.record(3, _shard(3), {"attempts": 1})  # pending past the gap: its own shard file
    f = tmp_path / "L" / "ledger.safetensors"
    assert io.read_state_header(f)["meta"]["through"] == 2
    (_rewrite(f, "f", through=bad) if how == "rewrite" else _edit_header(f, through=bad))
    again = _ledger(tmp_path / "L")
    with pytest.warns(SondeWarning) as w:
        assert again.load() == 0
    msgs = [str(x.message) for x in w if issubclass(x.category, SondeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and ("starts over" in msgs[0] or "starting over" in msgs[0]), msgs
    assert again.through == 0 and again.state is None and not again.pending  # nothing of it is used
    _finish(again)
    assert again.state["order"] == [0, 1, 2, 3] and again.state["n_texts"] == 8 and again.state["x"].tolist() == [10.0]
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == ["ledger.safetensors"]


def test_ledger_checks_records_counts_and_shard_files(tmp_path):
    led = _ledger(tmp_path / "L")
    for i in (0, 1):
        led.record(i, _shard(i), {"attempts": 1})
    f = tmp_path / "L" / "ledger.safetensors"
    # through changed consistently in the header and beside the state: shard 2 was never recorded
    tree, meta = io.load_state(f, "f")
    tree["progress"] = dict(tree["progress"], through=3)
    io.save_state(f, tree, fingerprint="f", meta=tree["progress"])
    with pytest.warns(SondeWarning, match="shard 2 was never recorded"):
        assert _ledger(tmp_path / "L").load() == 0
    # ... and with a record for shard 2 added, the item counts disagree
    tree["meta"][2] = {"attempts": 1}
    io.save_state(f, tree, fingerprint="f", meta=tree["progress"])
    with pytest.warns(SondeWarning, match="counts 4 items for the first 3 shards, which hold 6"):
        assert _ledger(tmp_path / "L").load() == 0
    tree["progress"]["items"] = 6
    io.save_state(f, tree, fingerprint="f", meta=tree["progress"])
    with pytest.warns(SondeWarning, match="its state covers 4 items, the first 3 shards hold 6"):
        assert _ledger(tmp_path / "L").load() == 0
    with pytest.warns(SondeWarning, match="made for n_shards=4, this sweep has 5"):  # another sharding
        assert _ledger(tmp_path / "L", sizes=(2, 2, 2, 1, 1)).load() == 0
    # a shard file claiming another index, or another size, is ignored and its shard runs again
    led = _ledger(tmp_path / "M")
    led.record(0, _shard(0), {"attempts": 1})
    led.record(2, _shard(2), {"attempts": 1})
    led.record(3, _shard(3, size=5), {"attempts": 1})
    _rewrite(tmp_path / "M" / "shard-00002.safetensors", "f", index=1)
    with pytest.warns(SondeWarning) as w:
        again = _ledger(tmp_path / "M")
        assert again.load() == 1
    msgs = sorted(str(x.message) for x in w)
    assert len(msgs) == 2 and "shard-00002" in msgs[0] and "header and its contents disagree" in msgs[0]
    assert "shard-00003" in msgs[1] and "covers 5 items, shard 3 hold 2" in msgs[1]
    assert sorted(_finish(again).state["order"]) == [0, 1, 2, 3] and again.state["n_texts"] == 8


def test_ledger_clear_removes_only_its_own_files(tmp_path):
    folder = tmp_path / "L"
    led = _ledger(folder)
    led.record(1, _shard(1), {"attempts": 1})
    led.record(0, _shard(0), {"attempts": 1})
    led.record(3, _shard(3), {"attempts": 1})
    (folder / "notes.txt").write_text("the user's")
    (folder / "shard-99.safetensors").write_text("not a state")
    led.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "shard-99.safetensors"]
    ck = io.Checkpoint(tmp_path / "C", fingerprint="run")
    ck.save(1, {"m": Mean(dims=(0,))})
    ck.clear()
    assert not (tmp_path / "C").exists()


def test_sweep_with_altered_ledger_gives_the_clean_result(tmp_path, tiny, monkeypatch):
    """A real routes sweep stops after 2 of 3 shards; its ledger's ``through`` is altered; the re-run warns once,
    starts over and gives the numbers of a clean sweep."""
    from analyses import routes

    eng = cluster.LocalEngine(tiny("llama"), max_retries=0)
    recs = RECORDS
    cfg, scfg = routes.DatasetConfig(max_tokens=16), cluster.SweepConfig(shard_size=2, max_retries=0)
    clean = cluster.sweep("routes", recs, config=cfg, engine=eng, sweep_config=scfg).result
    for bad in (3, 1, "2", 10 ** 18):
        ledger = tmp_path / f"ledger-{bad}"
        monkeypatch.setenv(cluster.FAULT_ENV, "2:always")
        with pytest.raises(cluster.ShardFailedError):
            cluster.sweep("routes", recs, config=cfg, engine=eng, sweep_config=scfg, ledger=ledger)
        monkeypatch.delenv(cluster.FAULT_ENV)
        f = ledger / "ledger.safetensors"
        assert io.read_state_header(f)["meta"]["through"] == 2
        fp = io.read_state_header(f)["fingerprint"]
        _rewrite(f, fp, through=bad)
        with pytest.warns(SondeWarning, match="ignoring the merge ledger .*the sweep starts over"):
            run = cluster.sweep("routes", recs, config=cfg, engine=eng, sweep_config=scfg, ledger=ledger)
        assert run.report.shards_resumed == 0 and run.report.shards_run == 3
        got = run.result
        assert got.n.tolist() == clean.n.tolist() == [3.0, 3.0] and got.n_skipped == clean.n_skipped
        assert torch.equal(got.head_freq, clean.head_freq) and torch.equal(got.ffn_mean, clean.ffn_mean)


# ----------------------------------------------------------------------------- failed runs leave nothing
def _demo_result():
    from test_store_io import _demo

    return _demo()


def test_failed_export_leaves_no_result_and_no_file(tmp_path):
    from analyses.cli.common import save_result

    out, html = tmp_path / "r", tmp_path / "new" / "deeper" / "page.html"

    def no_space(tmp):
        Path(tmp).write_text("<html>half")
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match=f"cannot write '{html}' \\(No space left on device\\); nothing was saved") as e:
        save_result(_demo_result(), out, {html: no_space})
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no result, no temp file, no folder made for the export
    with pytest.raises(InputError, match="cannot write .*page.html.*ValueError: bad figure"):
        save_result(_demo_result(), out, {html: lambda tmp: (_ for _ in ()).throw(ValueError("bad figure\nmore"))})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a result that exists stays as it was when the export of its replacement fails
    first = save_result(_demo_result(), out, {html: lambda tmp: Path(tmp).write_text("<html>1")})
    before = tree_hash(tmp_path)
    with store.replacing(), pytest.raises(InputError, match="nothing was saved"):
        save_result(_demo_result(), out, {html: no_space, None: no_space})
    assert tree_hash(tmp_path) == before and first == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "r"] and html.read_text() == "<html>1"


def test_cli_failed_html_export_leaves_nothing(tmp_path, tiny_dir, capsys, monkeypatch):
    from analyses.core import report
    from conftest import run_cli

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("mine")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SONDE_RESULTS", str(ws / "sonde-results"))

    def disk_full(fig, path):
        Path(path).write_text("<html>half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_html", disk_full)
    before = tree_hash(ws)
    code, out, err = run_cli(["run", "logit-lens", "-m", str(tiny_dir), "--prompt", "hi there", "--device", "cpu",
                              "--out", str(ws / "lens"), "--html", str(ws / "lens.html")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(ws / "lens.html") in errors[0] and "No space left" in errors[0], err
    assert tree_hash(ws) == before  # no result folder, no html, no temporary file


def test_refused_checkpoint_sweep_leaves_no_work_folder(tmp_path, monkeypatch, capsys):
    from analyses.core import checkpoints
    from conftest import run_cli
    from probes.errors import ModelLoadError

    monkeypatch.setenv("SONDE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    cfg = checkpoints.Config(analysis="logit_lens", checkpoints=(str(tmp_path / "missing-step100"),))
    with pytest.raises(ModelLoadError):
        checkpoints.run(cfg, out=out, device="cpu")
    assert not io.work_dir(out, "sweep-parts").exists() and not out.exists()
    code, _, err = run_cli(["run", "sweep", "logit-lens", "--checkpoints", str(tmp_path / "missing-step100"), "--device", "cpu",
                            "--out", str(out)], capsys)
    assert code == 2 and err.count("error:") == 1
    assert not io.work_dir(out, "sweep-parts").exists() and not out.exists()
    work = tmp_path / "cache" / "work"
    assert not work.exists() or not list(work.iterdir())
