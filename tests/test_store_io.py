"""Results store (atomic, content-keyed round trip) and input readers (line-numbered errors)."""

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from analyses.core import store
from analyses.core.io import Checkpoint, iter_jsonl, iter_records, read_text
from probes import InputError, Mean


def test_write_read_round_trip(tmp_path):
    out = store.write_result(tmp_path / "r1", analysis="demo", model={"name": "m", "fingerprint": "abc"},
                             config={"tau": 0.04}, input_hash="h", tables={"main": pd.DataFrame({"a": [1, 2]})},
                             arrays={"x": torch.arange(6.).reshape(2, 3)}, extra={"note": "hi"}, timings={"run": 1.5})
    r = store.read_result(out)
    assert r.analysis == "demo" and r.config == {"tau": 0.04} and r.extra == {"note": "hi"}
    assert r.tables["main"]["a"].tolist() == [1, 2]
    assert torch.equal(r.arrays["x"], torch.arange(6.).reshape(2, 3))
    assert r.manifest["key"] == store.result_key("demo", "abc", {"tau": 0.04}, "h")
    assert "torch" in r.manifest["versions"]
    df = store.list_results(tmp_path)
    assert df["analysis"].tolist() == ["demo"]
    assert store.find_result(r.manifest["key"], tmp_path) == out


_DIE_MID_WRITE = textwrap.dedent("""
    import os, pandas as pd
    from analyses.core import store
    real = pd.DataFrame.to_parquet
    def slow(self, *a, **k):
        real(self, *a, **k)
        os._exit(9)   # die mid-write
    pd.DataFrame.to_parquet = slow
""")


def test_killed_write_leaves_no_complete_result(tmp_path):
    """A process killed while writing leaves only a hidden temp folder, which readers ignore."""
    code = _DIE_MID_WRITE + textwrap.dedent(f"""
        store.write_result({str(tmp_path / 'r')!r}, analysis='demo', model={{}}, config={{}}, input_hash='',
                           tables={{'a': pd.DataFrame({{'x': [1]}}), 'b': pd.DataFrame({{'y': [2]}})}})
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    assert not (tmp_path / "r").exists()
    assert store.list_results(tmp_path).empty
    with pytest.raises(InputError, match="not a Sonde result"):
        store.read_manifest(tmp_path / "r")


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok one", "domain": "a"}\n{bad json\n\n{"text": "ok two"}\n["list"]\n{"nottext": 1}\n\xff\xfe\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        list(iter_records(f))
    with pytest.warns(UserWarning) as w:
        recs = list(iter_records(f, on_error="skip"))
    assert [(r.text, r.domain, r.line) for r in recs] == [("ok one", "a", 1), ("ok two", None, 4)]
    msgs = " ".join(str(x.message) for x in w)
    assert "line 5" in msgs and "line 6" in msgs and "line 7 is not UTF-8" in msgs
    with pytest.raises(InputError, match="does not exist"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


def test_non_utf8_text_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8.*offset 3"):
        read_text(f)


def test_checkpoint_resume_is_exact(tmp_path):
    data = [torch.randn(2, 3) for _ in range(10)]
    full = Mean(dims=(0,))
    for x in data:
        full.update(x)
    # first run: stops after 6 items with a checkpoint at 6
    ck = Checkpoint(tmp_path / "ck", fingerprint="run1")
    r = Mean(dims=(0,))
    for i, x in enumerate(data[:6]):
        r.update(x)
    ck.save(6, {"m": r})
    # resumed run
    r2 = Mean(dims=(0,))
    done = Checkpoint(tmp_path / "ck", fingerprint="run1").restore({"m": r2})
    assert done == 6
    for x in data[done:]:
        r2.update(x)
    assert torch.allclose(r2.finalize(), full.finalize())
    assert r2.count == full.count
    assert Checkpoint(tmp_path / "ck", fingerprint="other").restore({"m": Mean()}) == 0


def test_killed_replacement_keeps_the_old_result(tmp_path):
    """A process killed while writing a replacement (``replace=True``) leaves the old result readable."""
    old = store.write_result(tmp_path / "r", analysis="demo", model={}, config={"v": 1}, input_hash="",
                             tables={"a": pd.DataFrame({"x": [1]})})
    code = _DIE_MID_WRITE + textwrap.dedent(f"""
        store.write_result({str(old)!r}, analysis='demo', model={{}}, config={{'v': 2}}, input_hash='', replace=True,
                           tables={{'a': pd.DataFrame({{'x': [2]}})}})
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    r = store.read_result(old)
    assert r.config == {"v": 1} and r.tables["a"]["x"].tolist() == [1]
    assert store.list_results(tmp_path)["path"].tolist() == [str(old)]
