"""Generated inputs (Hypothesis) for the CLI's options and the Python entry points.

Each CLI run either succeeds (exit 0, a result where ``--out`` said) or fails with exit status 2, exactly one
``error: ...`` line on stderr, as the last line, no traceback, and nothing at ``--out``. Values that pass run on a
tiny random model saved to a folder once per module (in-process, through ``conftest.run_cli``), so each example
costs a fraction of a second. Python entry points either return or raise a :class:`probes.SondeError`.

The example counts are bounded (``max_examples`` per property) so that the file stays well under a minute and a
half on two cores; raise ``SONDE_FUZZ_EXAMPLES`` for a longer search.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tiny_models  # noqa: E402
from conftest import run_cli  # noqa: E402

from probes import ConfigError, DeviceError, InputError, SondeError  # noqa: E402

N = int(os.environ.get("SONDE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAST = settings(FUZZ, max_examples=4 * N)  # pure parsers: no model, no files
_IDS = itertools.count()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model folder, a small embedding matrix and files of odd kinds."""
    w = tmp_path_factory.mktemp("fuzz")
    model, tok = tiny_models.build("llama")
    model.save_pretrained(w / "tiny", safe_serialization=True)
    tok.save_pretrained(w / "tiny")
    np.save(w / "matrix.npy", np.random.default_rng(0).standard_normal((120, 8)).astype(np.float32))
    (w / "prompts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello there", "a b c d e f g")))
    (w / "plain.txt").write_text("one line\nanother line\n")
    (w / "empty.txt").write_bytes(b"")
    (w / "blank.jsonl").write_text("\n \n")
    (w / "junk.jsonl").write_bytes(bytes(range(256)))
    (w / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (w / "data.csv").write_text("text\nhello\n")
    (w / "bad.parquet").write_bytes(b"PAR1 nope PAR1")
    (w / "folder.jsonl").mkdir()
    os.mkfifo(w / "fifo.jsonl")
    (w / "loop.jsonl").symlink_to(w / "loop.jsonl")
    return w


@pytest.fixture(autouse=True)
def _results(ws, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(ws / "sonde-results"))
    monkeypatch.setenv("SONDE_CACHE", str(ws / "cache"))


def _out(ws: Path) -> Path:
    return ws / "out" / f"r{next(_IDS)}"


def _check(capsys, args: list[str], out: Path | None) -> int:
    """Run the CLI; exit 0 leaves a result at ``out``, exit 2 one last ``error:`` line and nothing at ``out``."""
    code, stdout, stderr = run_cli([str(a) for a in args], capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stdout + stderr, (args, stderr[-3000:])
    assert code in (0, 2), (args, code, stderr[-3000:])
    event(f"exit {code}")  # pytest --hypothesis-show-statistics shows how often each outcome came up
    if code == 2:
        assert lines and lines[-1].startswith("error: "), (args, stderr)
        assert sum(line.startswith("error:") for line in lines) == 1, (args, stderr)
        assert out is None or not os.path.lexists(out), (args, "a failed run left", out)
    else:
        assert not any(line.startswith("error:") for line in lines), (args, stderr)
        assert out is None or out.exists(), (args, stdout)
    return code


# ----------------------------------------------------------------------------- strategies
def _ranges(sep: str, lo: int = -3, hi: int = 10**9):
    """Texts like ``"0-1,5"`` / ``"0:300:7"``: mostly well formed, with odd numbers and odd separators."""
    num = st.one_of(st.integers(0, 3), st.integers(lo, hi))
    part = st.one_of(num.map(str), st.tuples(num, num).map(lambda t: f"{t[0]}{sep}{t[1]}"),
                     st.tuples(num, num, st.integers(-2, 50)).map(lambda t: f"{t[0]}{sep}{t[1]}{sep}{t[2]}"))
    well_formed = st.lists(part, min_size=0, max_size=4).map(",".join)
    return st.one_of(well_formed, st.text(alphabet=f"0123456789{sep}, -+aleE.", max_size=14))


# anything a command line can hold: NUL, newlines, other scripts (no lone surrogates: stderr would print them escaped)
ODD_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ODD_FILES = ["prompts.jsonl", "plain.txt", "empty.txt", "blank.jsonl", "junk.jsonl", "latin.txt", "data.csv", "bad.parquet",
             "folder.jsonl", "fifo.jsonl", "loop.jsonl", "missing.jsonl", "/dev/null", "/proc/self/status", "/", "hf:"]


def one_odd(**pairs):
    """Options drawn together: each from its usual values, except at most one drawn from its odd ones, so that
    a fair share of runs succeed and each refusal has one cause."""
    names = list(pairs)
    return st.sampled_from([None, *names]).flatmap(
        lambda odd: st.fixed_dictionaries({n: pairs[n][1] if n == odd else pairs[n][0] for n in names}))


# ----------------------------------------------------------------------------- the CLI
@FUZZ
@given(o=one_odd(layers=(st.sampled_from(["0", "1", "0-1", "all", "1,0"]), _ranges("-"))))
def test_lens_layers(ws, capsys, o):
    out = _out(ws)
    _check(capsys, ["run", "logit-lens", "-m", ws / "tiny", "-p", "hi there", "--layers", o["layers"], "--device", "cpu",
                    "--out", out], out)


@FUZZ
@given(o=one_odd(tokens=(st.sampled_from(["0:5", "3,7,9", "0:120:40", "all", "100:90:-3"]), _ranges(":", hi=10**12))))
def test_fiber_tokens(ws, capsys, o):
    out = _out(ws)
    _check(capsys, ["run", "fiber", "--matrix", ws / "matrix.npy", "--tokens", o["tokens"], "--vol-min", "5", "--vol-max", "60",
                    "--window", "5", "--out", out], out)


@FUZZ
@given(o=one_odd(positions=(st.sampled_from(["0", "0,1", "1"]), st.one_of(_ranges(","), ODD_TEXT)),
                 threads=(st.integers(1, 3), st.integers(-5, 10**6)),
                 T=(st.integers(4, 12), st.integers(-2, 200)),
                 eps=(st.floats(0.01, 0.99), st.floats(allow_nan=True, allow_infinity=True, width=32))))
def test_sinks_numbers(ws, capsys, o):
    out = _out(ws)
    _check(capsys, ["run", "sinks", "-m", ws / "tiny", "--domain", "prose", "-n", "1", "--T", o["T"], "--positions", o["positions"],
                    "--threads", o["threads"], "--eps", repr(o["eps"]), "--device", "cpu", "--out", out], out)


@FUZZ
@given(o=one_odd(path=(st.sampled_from(["prompts.jsonl", "plain.txt"]), st.sampled_from(ODD_FILES)),
                 max_tokens=(st.integers(2, 64), st.integers(-1, 10**7))))
def test_routes_input_files(ws, capsys, o):
    out = _out(ws)
    path = o["path"]
    p = path if path.startswith(("/", "hf:")) else ws / path
    _check(capsys, ["run", "routes", "-m", ws / "tiny", "-i", p, "--max-tokens", o["max_tokens"], "--device", "cpu",
                    "--out", out], out)


@FUZZ
@given(o=one_odd(device=(st.sampled_from(["cpu", "cpu:0", " cpu ", "auto"]),
                         st.one_of(st.sampled_from(["cpu:1", "cuda", "cuda:0", "cuda:99", "mps", "mps:1", "meta", "xpu", "auto:0",
                                                    "cuda:-1", "cpu:00"]), ODD_TEXT)),
                 k=(st.integers(1, 5), st.integers(-3, 10**6))))
def test_device_and_k(ws, capsys, o):
    device = o["device"]
    if torch.cuda.is_available() and device.strip().startswith(("cuda", "auto")):
        device = "cpu"  # a GPU run is not this test's business
    out = _out(ws)
    _check(capsys, ["run", "logit-lens", "-m", ws / "tiny", "-p", "hi", "--device", device, "--k", o["k"], "--out", out], out)


@FUZZ
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536)), host=st.one_of(st.just("127.0.0.1"), ODD_TEXT))
def test_dashboard_port_out_of_range(capsys, port, host):
    # only ports that cannot be valid: a valid port and host would start the server
    assert _check(capsys, ["dashboard", "--port", port, "--host", host], None) == 2


@FUZZ
@given(o=one_odd(hooks=(st.sampled_from(["blocks.0.hook_resid_post", "blocks.1.attn.hook_z,blocks.0.hook_resid_pre", "hook_embed"]),
                        st.one_of(st.text(alphabet="blocks.0123456789_hookresidpost ,", max_size=40), ODD_TEXT)),
                 model=(st.just("tiny"), st.sampled_from(["folder.jsonl", "missing", "matrix.npy", "data.csv", "/dev/null", ""]))))
def test_capture_hooks_and_models(ws, capsys, o):
    out = ws / "out" / f"c{next(_IDS)}.safetensors"
    model = o["model"]
    m = model if model in ("", "/dev/null") else ws / model
    _check(capsys, ["capture", "-m", m, "-p", "hello", "--hooks", o["hooks"], "--device", "cpu", "--out", out], out)


# ----------------------------------------------------------------------------- Python entry points
@pytest.fixture(scope="module")
def probe():
    return tiny_models.probe("llama")


_IDS_LIST = st.lists(st.integers(-5, 300), min_size=0, max_size=6)
RUN_INPUTS = st.one_of(st.text(max_size=40), st.binary(max_size=8), st.none(), _IDS_LIST, st.lists(_IDS_LIST, max_size=3),
                       st.lists(st.text(max_size=3), max_size=3), st.floats(), st.lists(st.floats(), max_size=3),
                       st.lists(st.booleans(), max_size=3))


@FUZZ
@given(x=RUN_INPUTS)
def test_probe_run(probe, x):
    try:
        logits = probe.run(x)
    except InputError:
        return
    assert logits.ndim == 3 and logits.shape[-1] == probe.info.d_vocab


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.text(max_size=3).map(lambda t: t * 5000)),
       max_length=st.one_of(st.none(), st.integers(-2, 400)), truncate=st.booleans(), bos=st.sampled_from([None, True, False]))
def test_to_tokens(probe, text, max_length, truncate, bos):
    try:
        ids = probe.to_tokens(text, max_length=max_length, truncate=truncate, prepend_bos=bos)
    except InputError:
        return
    limit = max_length or probe.info.n_ctx
    assert ids.ndim == 2 and ids.shape[0] == 1 and 0 < ids.shape[1] <= limit


@FAST
@given(spec=st.one_of(_ranges(":", hi=10**15), ODD_TEXT), rows=st.one_of(st.none(), st.integers(1, 300_000)))
def test_parse_tokens(spec, rows):
    from analyses.cli.fiber import MAX_TOKEN_IDS, parse_tokens

    try:
        got = parse_tokens(spec, rows)
    except ConfigError:
        return
    assert got is None or (0 < len(got) <= MAX_TOKEN_IDS and min(got) >= 0 and (rows is None or max(got) < rows))


@FAST
@given(spec=st.one_of(_ranges("-", hi=10**15), ODD_TEXT), n=st.integers(1, 100))
def test_parse_layers(spec, n):
    from analyses.cli.logit_lens import _parse_layers

    try:
        got = _parse_layers(spec, n)
    except ConfigError:
        return
    assert got is None or (len(got) == len(set(got)) and all(0 <= i < n for i in got))


@FAST
@given(device=st.one_of(ODD_TEXT, st.sampled_from(["cpu:3", "cuda:7", "mps", "meta", "vulkan", "cpu:0", "hpu"])))
def test_resolve_device(device):
    from probes.loading import resolve_device

    try:
        dev = resolve_device(device)
    except DeviceError:
        return
    assert dev.type in ("cpu", "cuda", "mps")


@FAST
@given(host=st.one_of(st.sampled_from(["127.0.0.1", "localhost", "::1", "0.0.0.0", "192.0.2.1", ""]), ODD_TEXT),
       port=st.one_of(st.integers(-10, 70000), ODD_TEXT))
def test_address_problem(host, port):
    from dashboard.serve import address_problem

    got = address_problem(host, port)
    assert got is None or (isinstance(got, str) and "\n" not in got)


@FUZZ
@given(name=st.sampled_from(["prompts.jsonl", "plain.txt", "empty.txt", "blank.jsonl", "junk.jsonl", "latin.txt", "data.csv",
                             "bad.parquet", "folder.jsonl", "fifo.jsonl", "loop.jsonl", "missing.jsonl"]),
       on_error=st.sampled_from(["stop", "skip", "maybe"]))
def test_iter_records(ws, name, on_error):
    import warnings

    from analyses.core.io import iter_records

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            recs = list(iter_records(ws / name, on_error=on_error))
        except SondeError as e:
            assert "\n" not in str(e)
            return
    assert all(isinstance(r.text, str) and r.text.strip() for r in recs)
