"""The memory planner: estimates against measured peaks, batch/chunk choice, the OOM retry, `sonde plan`."""

import json

import pytest
import torch

from analyses.core import planner
from analyses import routes
from probes import ConfigError, OutOfMemoryError
from conftest import run_cli
from peaks import measure, needs_proc

# SmolLM2-135M's sizes (what ModelInfo reports for the embedded model), so unit tests load no model
SMOL = planner.ModelShape(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536, d_vocab=49152,
                          n_params=134_515_008)


# ----------------------------------------------------------------------------- estimate
def test_estimate_grows_with_batch_and_length_and_adds_each_analysis_needs():
    f = [planner.estimate("forward", SMOL, seq_len=64, batch_size=b).total for b in (1, 2, 4, 8)]
    assert f == sorted(f) and f[0] < f[-1]
    assert planner.estimate("forward", SMOL, seq_len=128, batch_size=4).total > planner.estimate("forward", SMOL, seq_len=64, batch_size=4).total
    fw = planner.estimate("forward", SMOL, seq_len=2048, batch_size=2)
    sk = planner.estimate("sinks", SMOL, seq_len=2048, batch_size=2)
    assert sk.parts["pattern"] == 4 * 2 * 9 * 2048**2 * 4 and sk.activations > fw.activations  # T² dominates here
    gen = planner.estimate("generate", SMOL, seq_len=100, batch_size=4, new_tokens=28)
    assert gen.parts["kv_cache"] == 2 * 30 * 4 * 3 * 64 * 128 * 4
    assert fw.weights == SMOL.n_params * 4
    assert planner.estimate("bigram", SMOL, seq_len=128, batch_size=8).activations > planner.estimate("forward", SMOL, seq_len=128, batch_size=8).activations


def test_routes_estimate_follows_the_routes_chunk_rule_and_prompt_limit():
    assert planner.memory_model("routes").chunk is routes._chunk_size  # the kernel's own rule, not a copy
    eager = routes.Config(kernel="eager")
    for T, mb in [(64, 256), (512, 16), (2000, 1)]:
        q = routes._chunk_size(T, 9, 576, mb)
        e = planner.estimate("routes", SMOL, seq_len=T, chunk_mb=mb, config=eager)
        # one [Q, k, H, d] temporary, k the chunk's last query + 1: at most the last full chunk's or the partial one's
        assert e.parts["proximity_chunk"] == max(q * q * (T // q), (T % q) * T) * 9 * 576 * 4 <= q * T * 9 * 576 * 4
        # the fused kernel holds only [Q, T, H] weights and output
        fused = planner.estimate("routes", SMOL, seq_len=T, chunk_mb=mb, config=eager.replace(kernel="compiled"))
        assert fused.parts["proximity_chunk"] == routes._chunk_size(T, 9, 2, mb) * T * 9 * 4 * 2
    # the config's mode picks the terms: top-down stores no [T, T] arrays
    top = planner.estimate("routes", SMOL, seq_len=2000, config=routes.Config(mode="route"))
    assert "layer_store" in top.parts and top.parts["importances"] == 30 * 8 * 2000 * 9 * 4
    T = routes.max_prompt_tokens(30, 9, 2.0)  # longest prompt whose [L,T,T,H] importances fit 2 GiB
    assert planner.estimate("routes", SMOL, seq_len=T).parts["importances"] <= 2.0 * 2**30 * 1.01


def test_estimate_errors_name_the_fix():
    with pytest.raises(ConfigError, match="knows no analysis 'sink'.*forward, generate, .*sinks"):
        planner.estimate("sink", SMOL, seq_len=8)
    with pytest.raises(ConfigError, match="seq_len=0"):
        planner.estimate("forward", SMOL, seq_len=0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        planner.estimate("forward", SMOL, seq_len=8, batch_size=0)
    with pytest.raises(ConfigError, match="n_layers=0"):
        planner.ModelShape(n_layers=0, n_heads=1, n_kv_heads=1, d_model=8, d_head=8, d_mlp=8, d_vocab=8, n_params=8)
    with pytest.raises(ConfigError, match="not a memory size"):
        planner.parse_bytes("lots")
    assert planner.parse_bytes("1.5GiB") == int(1.5 * 2**30) and planner.parse_bytes("512MB") == 512_000_000
    with pytest.raises(ConfigError, match="headroom"):
        planner.plan("forward", SMOL, seq_len=8, free_bytes=2**30, headroom=1.5)


# ----------------------------------------------------------------------------- plan
def test_plan_picks_the_largest_batch_that_fits():
    free = 3 * 2**30
    p = planner.plan("sinks", SMOL, seq_len=256, free_bytes=free, headroom=0.8)
    assert p.fits and p.budget == int(free * 0.8)
    assert p.estimate.total <= p.budget < planner.estimate("sinks", SMOL, seq_len=256, batch_size=p.batch_size + 1).total
    assert f"batch size {p.batch_size}" in p.message and "free" in p.message
    # never above the batch asked for; says when it had to lower it
    assert planner.plan("sinks", SMOL, seq_len=256, batch_size=4, free_bytes=free).batch_size == 4
    low = planner.plan("sinks", SMOL, seq_len=256, batch_size=10_000, free_bytes=free)
    assert low.batch_size == p.batch_size and "lowered" in low.message
    # weights already on the device are not counted twice
    loaded = planner.plan("sinks", SMOL, seq_len=256, free_bytes=free, weights_loaded=True)
    assert loaded.batch_size > p.batch_size
    # nothing fits: the plan says so
    none = planner.plan("forward", SMOL, seq_len=256, free_bytes=100 * 2**20)
    assert not none.fits and none.batch_size == 1 and "exceeds" in none.message
    d = p.to_dict()
    assert d["peak_bytes"] == p.estimate.total and d["batch_size"] == p.batch_size


def test_plan_for_routes_lowers_the_chunk_budget():
    T = 1024
    eager = routes.Config(kernel="eager")  # (the fused kernel's chunks hold no [Q, T, H, d] parts)
    small = planner.estimate("routes", SMOL, seq_len=T, chunk_mb=1, config=eager).total
    p = planner.plan("routes", SMOL, seq_len=T, free_bytes=int((small + 200 * 2**20) / 0.8), chunk_mb=4096, config=eager)
    assert p.fits and p.chunk_mb < 4096 and p.batch_size == 1
    assert p.estimate.total <= p.budget and "chunk_mb=" in p.message


def test_free_memory_reads_the_device():
    free = planner.free_memory("cpu")
    import psutil

    assert 0 < free <= psutil.virtual_memory().total
    if torch.cuda.is_available():
        assert planner.free_memory("cuda") == torch.cuda.mem_get_info()[0] or planner.free_memory("cuda") > 0


# ----------------------------------------------------------------------------- OOM retry
def _hungry(limit: int):
    """fn(batch): a real torch allocation that fails (the CPU allocator refuses 2^60 bytes) above ``limit``."""
    calls = []

    def fn(b: int):
        calls.append(b)
        if b > limit:
            torch.empty(2**60, dtype=torch.uint8)
        return torch.ones(b).sum().item()

    return fn, calls


def test_retry_on_oom_halves_once_with_a_message():
    fn, calls = _hungry(4)
    msgs = []
    assert planner.retry_on_oom(fn, 8, what="sinks", log=msgs.append) == 4.0
    assert calls == [8, 4] and msgs == ["sinks ran out of memory at batch size 8; retrying once with batch size 4."]
    fn, calls = _hungry(1)
    with pytest.raises(OutOfMemoryError, match=r"at batch size 8 and again at 4.*--batch-size 2"):
        planner.retry_on_oom(fn, 8, log=msgs.append)
    assert calls == [8, 4]
    fn, calls = _hungry(0)
    with pytest.raises(OutOfMemoryError, match="at batch size 1"):
        planner.retry_on_oom(fn, 1, log=msgs.append)

    def probe_oom(b):  # what Probe.run raises after a CUDA OOM
        if b > 2:
            raise OutOfMemoryError(f"out of GPU memory on a batch of {b} x 64 tokens.")
        return b

    assert planner.retry_on_oom(probe_oom, 4, log=msgs.append) == 2

    def broken(b):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):  # other errors pass through untouched
        planner.retry_on_oom(broken, 8, log=msgs.append)


# ----------------------------------------------------------------------------- against measured peaks
_MEASURE = r"""
from analyses import sinks
for B, T in [(1, 64), (8, 64), (4, 256)]:
    toks = torch.randint(10, 1000, (B, T))
    out[f"forward {B}x{T}"] = peak(lambda: probe.run(toks))  # a plain forward: its [B, T, V] logits are returned
    out[f"sinks {B}x{T}"] = peak(lambda: sinks.collect_stats(probe, toks, positions=(0,), batch_size=B))
"""


@needs_proc
def test_estimate_is_within_2x_of_the_measured_peak_on_the_embedded_model():
    """Measured: peak resident memory above the loaded model's (Linux VmHWM after a clear_refs reset), in a
    subprocess whose malloc returns every large block at once (fixed mmap threshold), so RSS follows live tensors."""
    measured = measure(_MEASURE, threads=1, timeout=600)
    from probes.loading import embedded_model_dir
    from transformers import AutoConfig

    shape = planner.ModelShape.from_config(AutoConfig.from_pretrained(embedded_model_dir()))
    assert shape == SMOL
    for key, bytes_ in measured.items():
        kind, bt = key.split()
        B, T = map(int, bt.split("x"))
        est = planner.estimate(kind, shape, seq_len=T, batch_size=B).activations
        assert 0.5 <= est / bytes_ <= 2.0, (key, est / 2**20, bytes_ / 2**20)


# ----------------------------------------------------------------------------- CLI
def test_cli_plan(capsys):
    code, out, err = run_cli(["plan", "sinks", "--seq-len", "64", "--batch-size", "16", "--device", "cpu", "--free", "8GiB"], capsys)
    assert code == 0 and out.startswith("sinks on cpu at T=64: batch size 16, estimated peak") and "8.0 GiB free" in out
    code, out, _ = run_cli(["plan", "routes", "--seq-len", "256", "--device", "cpu", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["kind"] == "routes" and d["chunk_mb"] == 256 and d["weights_bytes"] == SMOL.n_params * 4
    code, _, err = run_cli(["plan", "attention", "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: the planner knows no analysis 'attention'") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["plan", "sinks", "--model", "nobody/nothing", "--device", "cpu"], capsys)
    assert code == 2 and "cannot read the config of 'nobody/nothing'" in err


# ----------------------------------------------------------------------------- every analysis, planned before loading
def test_every_analysis_declares_a_memory_model_and_plan_prints_each(capsys):
    from analyses.core import registry

    specs = registry.all_analyses()
    assert all(isinstance(s.memory, planner.MemoryModel) for s in specs.values()), [n for n, s in specs.items() if s.memory is None]
    verbs = {s.cli for s in specs.values() if s.cli}
    assert verbs <= set(planner.kinds())
    for verb in sorted(verbs):
        code, out, err = run_cli(["plan", verb, "--device", "cpu", "--free", "8GiB", "--json"], capsys)
        assert code == 0, (verb, err)
        p = json.loads(out)
        assert p["peak_bytes"] > 0 and p["fits"], (verb, p)
    # sizes left out come from the analysis's own defaults: bigram plans the paper's 32 x 128 batch
    code, out, _ = run_cli(["plan", "bigram", "--device", "cpu", "--free", "64GiB", "--json"], capsys)
    assert json.loads(out)["seq_len"] == 128


def test_memory_limit_lowers_the_batch_or_refuses_with_the_largest_setting(monkeypatch, capsys):
    from analyses import sinks

    """$SONDE_MEMORY_LIMIT caps the free memory the planner reads: a run is lowered to the largest batch that fits
    (one line), or refused before any model loads (exit 2, naming the largest setting that fits)."""
    limit = 900 * 2**20
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", "900MiB")
    assert planner.free_memory("cpu") <= limit
    cfg, p = planner.plan_config(sinks.MEMORY, "embedded", sinks.Config(T=256, batch_size=64), device="cpu", dtype="float32")
    assert cfg.batch_size == p.batch_size < 64 and "runs --batch-size 64 as" in p.message
    shape = planner.shape_of("embedded")
    assert planner.estimate("sinks", shape, seq_len=256, batch_size=cfg.batch_size).total <= 0.8 * limit
    assert planner.estimate("sinks", shape, seq_len=256, batch_size=cfg.batch_size + 1).total > 0.8 * limit
    # a batch that is part of the experiment (bb-toy) is not lowered: refused, with the largest that fits
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", "120MiB")
    code, _, err = run_cli(["run", "bb-toy", "--batch-size", "1024", "--seq-len", "256", "--steps", "1"], capsys)
    assert code == 2 and "not starting" in err and "The largest setting that fits is --batch-size" in err
    # not even one row fits: the longest rows that do
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", "680MiB")  # 544 MiB for the plan: the weights (513 MiB) and little else
    code, _, err = run_cli(["run", "sinks", "--device", "cpu", "-n", "2", "--T", "512"], capsys)
    assert code == 2 and "not starting" in err and "--batch-size 1 with rows of" in err and "(--T " in err
    code, _, err = run_cli(["run", "critical", "--device", "cpu", "--task", "builtin-arith", "--problems", "1",
                            "--max-new-tokens", "4096"], capsys)
    assert code == 2 and "not starting" in err
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", "lots")
    code, _, err = run_cli(["plan", "sinks", "--device", "cpu"], capsys)
    assert code == 2 and "SONDE_MEMORY_LIMIT" in err


def test_routes_cli_plans_its_chunk_before_loading(monkeypatch, capsys):
    """`sonde run routes` plans from the model's config before loading (cli.common.planned): under a memory limit it
    lowers --chunk-mb to the largest budget that fits, in one line, or refuses with exit 2 before any weights load."""
    prompt = "hi there"
    T = planner.tokens_bound(prompt)  # the length it plans for, known before the tokenizer loads
    shape = planner.shape_of("embedded")
    eager = routes.Config(kernel="eager")
    fits_16 = planner.estimate("routes", shape, seq_len=T, chunk_mb=16, config=eager).total
    fits_32 = planner.estimate("routes", shape, seq_len=T, chunk_mb=32, config=eager).total
    assert fits_32 > fits_16 + 2**20  # a budget just above the 16 MB chunk's estimate: 256 down to 32 do not fit
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", str(int((fits_16 + 2**20) / 0.8)))
    code, out, err = run_cli(["run", "routes", "--prompt", prompt, "--kernel", "eager", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    line = [ln for ln in err.splitlines() if ln.startswith("planner: ")]
    assert len(line) == 1 and "chunk_mb=16 " in line[0] and "lowered from the requested setting" in line[0]
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", "300MiB")  # not even the weights fit
    code, _, err = run_cli(["run", "routes", "--prompt", prompt, "--device", "cpu"], capsys)
    assert code == 2 and "not starting" in err and "planner" not in err


def test_tokens_bound_counts_with_the_tokenizer_alone_and_falls_back_to_bytes(tmp_path):
    """Before the weights load, a prompt is counted by the model's tokenizer (so a long English prompt is planned at
    its real length, about a quarter of its bytes), and by its UTF-8 bytes when no tokenizer can be read."""
    from probes import load_model

    text = "The Eiffel Tower is located in the city of Paris. " * 40
    n = len(load_model("embedded", device="cpu").tokenizer(text, add_special_tokens=False)["input_ids"])
    assert planner.tokens_bound(text, model="embedded") == n + 64
    assert n < len(text) // 3
    assert planner.tokens_bound(text, "short", model=str(tmp_path / "nothing-here")) == len(text.encode()) + 64
    assert planner.tokens_bound(text) == len(text.encode()) + 64
