"""Dataset sweeps (analyses.core.cluster): shard planning, the merge ledger, retries, resume, Ray workers.

The Ray tests share one local Ray instance (started by the engine, bound to 127.0.0.1) and one pair of
workers per module because Ray startup is slow here; they are exact: at the same torch thread count a
2-worker sweep equals the local single-process sweep and ``sinks.run`` / ``routes.run_dataset`` with
``torch.equal`` (identical batches, float64 sums folded in shard order), at 1 and 2 threads, in
this process and through the CLI in subprocesses whose own thread counts differ.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.core import cluster, domains
from analyses import routes, sinks
from analyses.core.io import iter_records, parse_hf_spec, read_state_header
from probes import ConfigError, InputError, SondeError

ROOT = Path(__file__).resolve().parents[1]
SINKS_CFG = sinks.Config(n_samples=16, batch_size=4, ablation_layers=2, ablation_samples=2)  # 8 texts used
ROUTES_CFG = routes.DatasetConfig(max_tokens=24)


# ----------------------------------------------------------------------------- no model
def test_plan_and_config_errors():
    assert [(s.start, s.stop) for s in cluster.plan_shards(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert str(cluster.plan_shards(7, 3)[2]) == "shard 2 (items 6..6)"
    with pytest.raises(InputError, match="no items"):
        cluster.plan_shards(0, 3)
    with pytest.raises(ConfigError, match="shard_size=0"):
        cluster.SweepConfig(shard_size=0)
    with pytest.raises(ConfigError, match="engine='gpu'"):
        cluster.SweepConfig(engine="gpu")
    with pytest.raises(ConfigError, match="--engine ray"):
        cluster.SweepConfig(engine="local", address="auto")
    with pytest.raises(ConfigError, match="Shardable analyses: .*routes.*sinks|Shardable analyses: .*sinks.*routes"):
        cluster.sweep("bigram", ["a"], config=SINKS_CFG, engine=None)
    assert cluster.parse_faults("3:2,5:always, 7") == {3: 2.0, 5: float("inf"), 7: 1.0}
    with pytest.raises(ConfigError, match="SONDE_FAULT_SHARD"):
        cluster.parse_faults("x")


def test_ledger_folds_in_order_and_resumes(tmp_path):
    add = lambda a, b: b if a is None else a + [b[0]]  # noqa: E731 - order-sensitive merge
    led = cluster.Ledger(tmp_path / "L", fingerprint="f", n_shards=4, merge=add)
    led.record(2, [2], {"attempts": 1})
    led.record(0, [0], {"attempts": 2})
    assert led.through == 1 and led.state == [0] and sorted(led.done) == [0, 2]
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == ["ledger.safetensors", "shard-00002.safetensors"]
    led.record(2, [99], {})  # a duplicate completion is ignored
    # a "killed" driver: a fresh ledger object resumes from disk
    again = cluster.Ledger(tmp_path / "L", fingerprint="f", n_shards=4, merge=add)
    assert again.load() == 2 and again.state == [0] and again.meta[0]["attempts"] == 2
    again.record(1, [1], {})
    again.record(3, [3], {})
    assert again.through == 4 and again.state == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == ["ledger.safetensors"]
    other = cluster.Ledger(tmp_path / "L", fingerprint="g", n_shards=4, merge=add)  # another sweep: not reused
    assert other.load() == 0 and other.state is None


def test_parquet_and_hf_inputs(tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["alpha beta", "", "gamma"], "domain": ["x", "y", None]}).to_parquet(f)
    with pytest.raises(InputError, match="d.parquet row 2"):
        list(iter_records(f))
    with pytest.warns(UserWarning, match="row 2"):
        recs = list(iter_records(f, on_error="skip"))
    assert [(r.text, r.domain, r.line) for r in recs] == [("alpha beta", "x", 1), ("gamma", None, 3)]
    pd.DataFrame({"body": ["a"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(InputError, match="no 'text' column \\(columns: body\\)"):
        list(iter_records(tmp_path / "b.parquet"))
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:train") == parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:train:text")
    assert parse_hf_spec("hf:org/set:train:content").field == "content"
    assert parse_hf_spec("hf:org/set:train").config is None
    with pytest.raises(InputError, match="hf:NAME\\[:CONFIG\\]:SPLIT"):
        parse_hf_spec("hf:only")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot stream hf:some/set:train: offline"):
        list(iter_records("hf:some/set:train", limit=2))


def test_corpus_records():
    recs = domains.corpus_records(("prose", "arithmetic"), n=3)
    assert [r.domain for r in recs] == ["prose"] * 3 + ["arithmetic"] * 3
    assert recs == domains.corpus_records(("prose", "arithmetic"), n=3)  # fixed order and content
    with pytest.raises(ConfigError, match="token-level"):
        domains.corpus_records(("prose", "random"))


# ----------------------------------------------------------------------------- local engine (the reference)
@pytest.fixture(scope="module")
def local_sinks(embedded):
    """(texts, sinks.run, the local 2-shard sweep) over 8 prose texts."""
    texts = domains.domain_texts("prose", n=8)
    run = cluster.sweep("sinks", texts, config=SINKS_CFG, engine=cluster.LocalEngine(embedded),
                        sweep_config=cluster.SweepConfig(shard_size=4))
    return texts, sinks.run(embedded, texts, config=SINKS_CFG), run


def test_local_sweep_equals_single_pass(local_sinks):
    _, ref, run = local_sinks
    got = run.result
    for k in ("alpha_mean", "exceed", "value_norm", "resid_norm"):
        assert torch.equal(getattr(got, k), getattr(ref, k)), k
    assert (got.n_samples, got.n_skipped, got.peak_layer, got.tokens) == (ref.n_samples, ref.n_skipped, ref.peak_layer, ref.tokens)
    pd.testing.assert_frame_equal(got.ablation, ref.ablation)
    assert run.report.n_shards == 2 and run.report.shards_run == 2 and run.report.retried == {}


def test_local_retry_and_failure(embedded, monkeypatch):
    recs = domains.corpus_records(("arithmetic",), n=4)
    eng = cluster.LocalEngine(embedded, max_retries=1)
    monkeypatch.setenv(cluster.FAULT_ENV, "1")
    run = cluster.sweep("routes", recs, config=ROUTES_CFG, engine=eng, sweep_config=cluster.SweepConfig(shard_size=2, max_retries=1))
    assert run.report.retried == {1: 2} and run.result.timings["sweep.retries"] == 1.0
    assert run.result.n.tolist() == [4.0]
    monkeypatch.setenv(cluster.FAULT_ENV, "1:always")
    with pytest.raises(cluster.ShardFailedError, match=r"shard 1 \(items 2..3\) failed after 2 attempts: ShardFault"):
        cluster.sweep("routes", recs, config=ROUTES_CFG, engine=eng, sweep_config=cluster.SweepConfig(shard_size=2, max_retries=1))


def test_cli_local_sweep(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "s"
    main(["run", "sinks", "--domain", "code", "-n", "8", "--batch-size", "4", "--no-ablation", "--engine", "local",
          "--shard-size", "4", "--out", str(out), "--json", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["shards"] == 2 and got["engine"] == "local" and got["samples"] + got["skipped (shorter than T)"] == 8
    assert json.loads((out / "sweep.json").read_text())["n_shards"] == 2
    assert not cluster.default_ledger(out).exists()  # the ledger goes once the result is saved
    with pytest.raises(SystemExit) as e:
        main(["run", "sinks", "--domain", "random", "--engine", "local", "--device", "cpu"])
    assert e.value.code == 2 and "token-level" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "sinks", "--domain", "code", "--engine", "local", "--shard-size", "0", "--device", "cpu"])
    assert e.value.code == 2 and "shard_size=0" in capsys.readouterr().err


def test_killed_sweep_resumes_without_duplicates(tmp_path, embedded):
    """A CLI sweep dies (SONDE_FAULT_EXIT_AFTER, like a kill) after 3 of 6 shards; the re-run counts each prompt once."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-c", "from analyses.cli import main; main()", "run", "routes", "--domains", "prose,code,arithmetic",
           "-n", "4", "--max-tokens", "24", "--engine", "local", "--shard-size", "2", "--out", str(out), "--json", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", cluster.EXIT_ENV: "3"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 75, p.stderr[-2000:]
    led = read_state_header(cluster.default_ledger(out) / "ledger.safetensors")  # JSON header only, no pickle
    assert led["meta"]["through"] == 3 and not out.exists()
    assert stat.S_IMODE(cluster.default_ledger(out).stat().st_mode) == 0o700  # a private folder
    env.pop(cluster.EXIT_ENV)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    assert got["prompts"] == 12 and got["shards resumed"] == 3
    res = routes.RouteStatsResult.load(out)
    ref = routes.run_dataset(embedded, domains.corpus_records(("prose", "code", "arithmetic"), n=4), config=ROUTES_CFG)
    assert res.domains == ref.domains and res.n.tolist() == ref.n.tolist() == [4.0, 4.0, 4.0]
    assert torch.equal(res.head_freq, ref.head_freq) and torch.equal(res.ffn_mean, ref.ffn_mean)


def _same_sinks(got, ref, what):
    for k in ("alpha_mean", "exceed", "value_norm", "resid_norm"):
        assert torch.equal(getattr(got, k), getattr(ref, k)), (what, k, (getattr(got, k).double() - getattr(ref, k).double()).abs().max())
    assert (got.n_samples, got.n_skipped, got.peak_layer, got.tokens) == (ref.n_samples, ref.n_skipped, ref.peak_layer, ref.tokens), what
    pd.testing.assert_frame_equal(got.ablation, ref.ablation, check_exact=True, obj=what)


# ----------------------------------------------------------------------------- Ray: refused before it starts
def test_model_options_reach_the_worker_spec():
    from analyses.cli import common
    from analyses.cli.sweeps import _model_spec

    token = common._SCALE.set({"revision": "v2", "device_map": "auto", "max_memory": "cpu=1GiB", "remote": False})
    try:
        spec = _model_spec("some/model", "nnsight", "cpu", "float32")
    finally:
        common._SCALE.reset(token)
    assert (spec.revision, spec.device_map, spec.max_memory, spec.remote) == ("v2", "auto", "cpu=1GiB", False)
    with pytest.raises(ConfigError, match="max_memory was given without device_map"):  # load() passes every field on
        cluster.ModelSpec("embedded", device="cpu", max_memory="cpu=1GiB").load()


REFUSED = [(["--remote"], "--remote runs the model on NDIF"),
           (["--device", "cuda"], "sees a GPU only when it is given one"),
           (["--device", "cpu", "--gpus-per-worker", "1"], "would sit idle"),
           (["--device", "cuda:1", "--gpus-per-worker", "1"], "numbers its own GPUs from 0"),
           (["--max-memory", "cpu=1GiB"], "max_memory was given without device_map"),
           (["--dtype", "float7"], "unknown dtype"),
           (["--backend", "jax"], "unknown backend"),
           (["--input", "EMPTY"], "holds no items")]
if not torch.cuda.is_available():
    REFUSED.append((["--gpus-per-worker", "1"], "this machine has 0 CUDA GPU"))


@pytest.mark.parametrize("args, match", REFUSED)
def test_cli_ray_refuses_before_ray_starts(args, match, tmp_path, capsys):
    pytest.importorskip("ray")
    import ray
    from analyses.cli import main

    (tmp_path / "empty.jsonl").write_text("")
    args = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in args]
    src = [] if "--input" in args else ["--domain", "prose"]
    with pytest.raises(SystemExit) as e:
        main(["run", "sinks", *src, "-n", "4", "--engine", "ray", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and err.strip().startswith("error:"), err
    assert not ray.is_initialized()


def test_cli_engines_agree_at_defaults(tmp_path):
    """CLI defaults (T=64, batch 8, shard 32, ablation on, --threads 1): one pass, local and 2 Ray workers give identical
    statistics, whatever the driver process's own thread count (the subprocesses start with 1 or 2 torch threads)."""
    pytest.importorskip("ray")
    data = tmp_path / "prose.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in domains.domain_texts("prose", n=36)))
    runs = {"one": ([], 2), "local": (["--engine", "local"], 1), "ray": (["--engine", "ray", "--workers", "2"], 2)}
    got = {}
    for name, (extra, nt) in runs.items():
        code = f"import torch; torch.set_num_threads({nt}); from analyses.cli import main; main()"
        cmd = [sys.executable, "-c", code, "run", "sinks", "--input", str(data), "-n", "36", "--device", "cpu", "--json",
               "--out", str(tmp_path / name), *extra]
        p = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(nt)}, capture_output=True,
                           text=True, cwd=ROOT, timeout=1200)
        assert p.returncode == 0, (name, p.stderr[-2000:])
        got[name] = sinks.SinksResult.load(tmp_path / name)
    assert got["one"].n_samples + got["one"].n_skipped == 36 and got["one"].n_samples > 8
    sw = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert sw["threads"] == 1 and sw["n_shards"] == 2 and len(set(sw["shard_workers"].values())) == 2
    _same_sinks(got["local"], got["one"], "local")
    _same_sinks(got["ray"], got["one"], "ray")


# ----------------------------------------------------------------------------- Ray (2 local workers on CPU)
@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    eng = cluster.RayEngine(cluster.ModelSpec("embedded", device="cpu"), cluster.SweepConfig(engine="ray", workers=2))
    assert eng._started  # this engine started Ray (bound to 127.0.0.1) and stops it on close
    yield eng
    eng.close()


def test_ray_binds_loopback(ray_engine):
    psutil = pytest.importorskip("psutil")
    listening = []
    for p in psutil.Process().children(recursive=True):  # GCS, raylet, agents, workers
        try:
            listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert len({name for name, _ in listening}) >= 3, listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


@pytest.mark.parametrize("shape", [dict(T=16, batch_size=4, shard_size=4, n=20), dict(T=24, batch_size=3, shard_size=6, n=12)])
def test_engines_agree_at_each_thread_count(ray_engine, embedded, shape):
    """Statistics depend on the torch thread count in the last bits; at a fixed count every engine agrees exactly."""
    n, shard = shape.pop("n"), shape.pop("shard_size")
    texts = domains.domain_texts("prose", n=n)
    cfg = sinks.Config(n_samples=n, **shape) if shape["T"] == 16 else sinks.Config(n_samples=n, ablation_layers=2, **shape)
    for threads in (1, 2):
        with cluster._threads(threads):
            one = sinks.run(embedded, texts, config=cfg)
        scfg = cluster.SweepConfig(shard_size=shard, threads=threads)
        loc = cluster.sweep("sinks", texts, config=cfg, engine=cluster.LocalEngine(embedded), sweep_config=scfg).result
        ray_ = cluster.sweep("sinks", texts, config=cfg, engine=ray_engine, sweep_config=scfg.replace(engine="ray")).result
        _same_sinks(loc, one, f"local, {threads} threads")
        _same_sinks(ray_, one, f"ray, {threads} threads")
        assert ray_.timings["sweep.threads"] == threads


def test_sampled_domain_same_rows_in_every_engine(ray_engine, embedded):
    """``sinks --domain prose -n 4 --T 90``: two of the first six prose texts are shorter than 90 tokens. Every engine
    draws the same six texts (domains.draw_texts) and measures the same four rows as the one-pass run."""
    cfg = sinks.Config(T=90, n_samples=4, batch_size=2, mlp_ablation=False)
    draw = dict(n=4, T=90, seed=cfg.seed, prepend_bos=sinks.bos_flag(cfg.bos))
    local = cluster.LocalEngine(embedded)
    texts = local.call(domains.draw_texts, "prose", **draw)
    assert ray_engine.call(domains.draw_texts, "prose", **draw) == texts
    assert len(texts) == 6 and texts == domains.domain_texts("prose", n=8)[:6]
    with cluster._threads(1):
        one = sinks.run(embedded, domain="prose", config=cfg)
    assert (one.n_samples, one.n_skipped) == (4, 2)
    scfg = cluster.SweepConfig(shard_size=2, threads=1)
    for name, eng, sc in (("local", local, scfg), ("ray", ray_engine, scfg.replace(engine="ray", shard_size=3))):
        got = cluster.sweep("sinks", texts, config=cfg, engine=eng, sweep_config=sc).result
        _same_sinks(got, one, name)
        assert got.input_hash == one.input_hash, name  # the same rows: the same result key


def test_ray_sweep_is_exact(ray_engine, embedded, local_sinks):
    assert ray_engine.workers == 2 and ray_engine.info["fingerprint"] == embedded.info.fingerprint
    texts, _, local = local_sinks
    scfg = cluster.SweepConfig(engine="ray", shard_size=4)
    got = cluster.sweep("sinks", texts, config=SINKS_CFG, engine=ray_engine, sweep_config=scfg)
    _same_sinks(got.result, local.result, "ray")  # tolerance 0: identical batches, same threads, same fold order
    assert got.result.n_samples == local.result.n_samples and got.result.peak_layer == local.result.peak_layer
    assert got.report.workers == 2 and len(set(got.report.shard_workers.values())) == 2  # both workers took shards

    recs = domains.corpus_records(("prose", "code", "arithmetic"), n=3)
    for threads in (1, 2):
        with cluster._threads(threads):
            ref = routes.run_dataset(embedded, recs, config=ROUTES_CFG)
        got = cluster.sweep("routes", recs, config=ROUTES_CFG, engine=ray_engine,
                            sweep_config=scfg.replace(shard_size=2, threads=threads)).result
        assert got.domains == ref.domains and got.n.tolist() == ref.n.tolist() == [3.0, 3.0, 3.0]
        for k in ("head_freq", "head_mean", "ffn_freq", "ffn_mean"):
            assert torch.equal(getattr(got, k), getattr(ref, k)), (threads, k)


def test_ray_retry_failure_and_resume(ray_engine, tmp_path, monkeypatch):
    recs = domains.corpus_records(("code", "arithmetic"), n=4)
    scfg = cluster.SweepConfig(engine="ray", shard_size=2, max_retries=1)
    monkeypatch.setenv(cluster.FAULT_ENV, "2")
    run = cluster.sweep("routes", recs, config=ROUTES_CFG, engine=ray_engine, sweep_config=scfg)
    assert run.report.retried == {2: 2} and run.result.timings["sweep.retries"] == 1.0
    path = run.result.save(tmp_path / "ok")
    run.report.save(path)
    assert json.loads((path / "manifest.json").read_text())["timings"]["sweep.retries"] == 1.0
    assert json.loads((path / "sweep.json").read_text())["retried"] == {"2": 2}
    single = run.result

    ledger = tmp_path / "ledger"
    monkeypatch.setenv(cluster.FAULT_ENV, "1:always")
    with pytest.raises(cluster.ShardFailedError, match=r"shard 1 \(items 2..3\) failed after 2 attempts") as e:
        cluster.sweep("routes", recs, config=ROUTES_CFG, engine=ray_engine, sweep_config=scfg, ledger=ledger)
    assert isinstance(e.value, SondeError) and "resume" in str(e.value)
    monkeypatch.delenv(cluster.FAULT_ENV)
    again = cluster.sweep("routes", recs, config=ROUTES_CFG, engine=ray_engine, sweep_config=scfg, ledger=ledger)
    assert again.report.shards_resumed == 3 and again.report.shards_run == 1
    assert again.result.n.tolist() == single.n.tolist() == [4.0, 4.0]
    assert torch.equal(again.result.head_mean, single.head_mean)
