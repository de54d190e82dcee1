"""Big-model plumbing: device maps with per-device limits, remote NDIF probes, checkpoint sweeps."""

import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

import tiny_models
from analyses.core import checkpoints
from analyses import sinks
from probes import Collect, ConfigError, DeviceError, Mean, ModelLoadError, UnknownSiteError, Ablate, from_hf, l2_norm, load_model
from probes.loading import parse_max_memory
from probes.remote import RemoteProbe, check_ndif
from conftest import messages, run_cli


def _save(tmp: Path, name: str, seed: int = 0, family: str = "llama") -> Path:
    m, tok = tiny_models.build(family, seed=seed)
    d = tmp / name
    m.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def tiny_dir(tmp_path):
    return _save(tmp_path, "tiny")


def _stats(probe, toks):
    return sinks.collect_stats(probe, toks, positions=(0, 1), batch_size=2)


# ----------------------------------------------------------------------------- device maps
def test_max_memory_parsing_and_errors():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory({"cpu": 2**30}) == {"cpu": 2**30}
    assert parse_max_memory(None) is None
    with pytest.raises(ConfigError, match="has no '='.*0=20GiB"):
        parse_max_memory("20GiB")
    with pytest.raises(ConfigError, match="'gpu0' is not a GPU index"):
        parse_max_memory("gpu0=1GiB")
    with pytest.raises(ConfigError, match="'lots' is not a size"):
        parse_max_memory("cpu=lots")


def test_device_map_errors(tiny_dir):
    with pytest.raises(ConfigError, match="max_memory was given without device_map.*device_map='auto'"):
        load_model(str(tiny_dir), device="cpu", max_memory="cpu=1GiB")
    with pytest.raises(ModelLoadError, match=r"max_memory=\{'cpu': '100KiB'\} leaves no room .* offloaded them to disk.*Raise the limits"):
        load_model(str(tiny_dir), device="cpu", device_map="auto", max_memory="cpu=100KiB")  # the limit reaches accelerate
    with pytest.raises(ConfigError, match="device_map='everywhere' is not known"):
        load_model(str(tiny_dir), device="cpu", device_map="everywhere")


def test_meta_planning_splits_across_two_devices_and_dispatched_model_gives_the_same_numbers(tiny_dir):
    """accelerate plans a split over two (phantom) GPUs on the meta device; the same split, placed on CPU
    through accelerate's dispatch hooks, gives bit-identical sink statistics to the plain model."""
    import warnings

    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    per_layer = sum(p.numel() * 4 for p in meta.model.layers[0].parameters())  # 57 KiB; the embedding is 64 KiB
    cap = int(per_layer * 1.5) + 70_000  # room for one block (or the embedding) beside accelerate's reserve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "device 0 is not available": planning only
        plan = infer_auto_device_map(meta, max_memory={0: cap, 1: cap, "cpu": 2**30}, no_split_module_classes=["LlamaDecoderLayer"])
    assert {0, 1} <= set(plan.values()), plan  # a real split: the embedding on GPU 0, block 0 on GPU 1, the rest on CPU
    assert plan["model.layers.0"] == 1 and plan["model.layers.1"] == "cpu"

    plain = load_model(str(tiny_dir), device="cpu")
    m, tok = tiny_models.build("llama")
    dispatched = dispatch_model(m, device_map={k: "cpu" for k in plan}, main_device="cpu", force_hooks=True)
    assert sum(hasattr(mod, "_hf_hook") for mod in dispatched.modules()) >= 3  # activations move through the hooks
    probe = from_hf(dispatched, tok)
    toks = torch.randint(4, 256, (4, 24))
    a, b = _stats(plain, toks), _stats(probe, toks)
    for k in ("alpha_mean", "exceed", "value_norm", "resid_norm"):
        assert torch.equal(a[k], b[k]), k
    # the loader's device_map + max_memory path (accelerate places every block on the CPU here)
    auto = load_model(str(tiny_dir), device="cpu", device_map="auto", max_memory="cpu=4GiB")
    c = _stats(auto, toks)
    for k in ("alpha_mean", "value_norm", "resid_norm"):
        assert torch.equal(a[k], c[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_across_gpu_and_cpu_gives_the_same_numbers(tiny_dir):
    """Block 0 on the GPU, block 1 and the head on the CPU: reducers see tensors on two devices."""
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
          "model.norm": "cpu", "lm_head": "cpu"}
    split = load_model(str(tiny_dir), device="cuda", dtype="float32", device_map=dm)
    devs = {p.device.type for p in split.hf_model.parameters()}
    assert devs == {"cuda", "cpu"}
    plain = load_model(str(tiny_dir), device="cpu")
    toks = torch.randint(4, 256, (4, 24))
    a, b = _stats(plain, toks), _stats(split, toks.to(split.device))
    for k in ("alpha_mean", "value_norm", "resid_norm"):
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- remote (NDIF)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ndif_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


def test_remote_without_key_or_network_fails_with_one_line(no_ndif_key, monkeypatch, capsys):
    with pytest.raises(ModelLoadError, match="needs an API key and network access; no NDIF API key is set.*NDIF_API_KEY"):
        load_model("meta-llama/Llama-3.1-8B", remote=True)
    from analyses.cli.common import load_probe

    with pytest.raises(ModelLoadError, match="no NDIF API key is set"):  # the CLI's --remote goes the same way
        load_probe("meta-llama/Llama-3.1-8B", remote=True, revision="main")
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there: offline
    with pytest.raises(DeviceError, match="needs network access to NDIF, but http://127.0.0.1:.* cannot be reached"):
        load_model("meta-llama/Llama-3.1-8B", remote=True)
    monkeypatch.setenv("NDIF_HOST", "ftp://ndif")
    with pytest.raises(DeviceError, match="not an http"):
        check_ndif()
    with pytest.raises(ConfigError, match="backend='transformer_lens' cannot run remotely"):
        load_model("meta-llama/Llama-3.1-8B", remote=True, backend="transformer_lens")
    with pytest.raises(ConfigError, match="device_map and max_memory do not apply"):
        load_model("meta-llama/Llama-3.1-8B", remote=True, device_map="auto")
    with pytest.raises(ModelLoadError, match="'embedded' is a local model"):
        load_model("embedded", remote=True)


def test_remote_checks_pass_then_the_config_is_read(monkeypatch):
    """With a key and a reachable host the loader goes on to build the skeleton (offline: the config read fails clearly)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{srv.getsockname()[1]}")
    try:
        assert check_ndif() == ("test-key", f"http://127.0.0.1:{srv.getsockname()[1]}")
        with pytest.raises(ModelLoadError, match="could not read the config of 'nobody/nothing' for a remote run"):
            load_model("nobody/nothing", remote=True)
    finally:
        srv.close()


def test_remote_trace_matches_local_through_nnsight_simulation():
    """``remote="local"``: nnsight serializes the trace exactly as for NDIF (Sonde's modules hidden), runs it
    here, and the reducers folded in afterwards give the local backend's numbers."""
    import warnings

    from nnsight import LanguageModel

    m, tok = tiny_models.build("llama")
    m2, _ = tiny_models.build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(m2, tokenizer=tok)
    remote = RemoteProbe(lm, tok, name="tiny", source="tiny", remote="local")
    local = from_hf(m, tok)
    assert remote.supports("remote") and not remote.supports("pattern")
    toks = local.to_tokens(["hello world", "abc defgh"])

    def reads():
        return {"blocks.1.hook_resid_post": Mean(dims=(0,), transform=l2_norm), "blocks.0.attn.hook_z": Collect(),
                "blocks.0.hook_mlp_out": Collect(), "hook_embed": Collect()}

    r_local, r_remote = reads(), reads()
    torch.testing.assert_close(local.run(toks, reads=r_local), remote.run(toks, reads=r_remote))
    for k in r_local:
        torch.testing.assert_close(r_local[k].finalize(), r_remote[k].finalize())
    with pytest.raises(UnknownSiteError, match="hook_pattern cannot be read on a remote model"):
        remote.run(toks, reads={"blocks.0.attn.hook_pattern": Collect()})
    with pytest.raises(ConfigError, match="edits cannot run on a remote model"):
        remote.run(toks, edits=[Ablate("blocks.0.hook_mlp_out")])


def test_remote_request_path_on_a_meta_skeleton(tiny_dir, monkeypatch):
    """A skeleton on the meta device (no weights) goes through nnsight's RemoteBackend up to the request;
    offline the failure is one DeviceError line."""
    import warnings

    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(str(tiny_dir), tokenizer=tok, dispatch=False)
    assert next(lm._module.parameters()).device.type == "meta"
    probe = RemoteProbe(lm, tok, name="tiny", source="ndif:tiny", remote=True)
    assert probe.info.n_layers == 2 and probe.info.device == "remote" and len(probe.info.fingerprint) == 16
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(DeviceError, match="the remote run failed") as e:
        probe.run(torch.tensor([[1, 5, 6, 7]]), reads={"blocks.0.hook_resid_post": Collect()})
    assert "\n" not in e.value.message
    with pytest.raises(UnknownSiteError, match="unembed needs the model's weights"):
        probe.unembed(torch.zeros(1, 64))


# ----------------------------------------------------------------------------- checkpoint sweeps
@pytest.fixture
def ckpt_dir(tmp_path):
    root = tmp_path / "ckpts"
    for i, step in enumerate((0, 500, 1000)):
        _save(root, f"step{step}", seed=i)
    return root


def test_checkpoint_resolution(ckpt_dir, tmp_path):
    found = checkpoints.checkpoints_in(ckpt_dir)
    assert [Path(p).name for p in found] == ["step0", "step500", "step1000"]  # by step, not by name
    cks = checkpoints.resolve_checkpoints(["step1000", str(ckpt_dir / "step0")], model="allenai/OLMo-1B-hf")
    assert cks[0].name == "allenai/OLMo-1B-hf" and cks[0].revision == "step1000" and cks[0].step == 1000
    assert cks[1].name == str(ckpt_dir / "step0") and cks[1].revision is None and cks[1].step == 0
    with pytest.raises(Exception, match="holds no checkpoint folder"):
        checkpoints.checkpoints_in(tmp_path / "ckpts" / "step0")
    with pytest.raises(ConfigError, match="no checkpoint was given"):
        checkpoints.Config(checkpoints=())
    with pytest.raises(ConfigError, match="has no option"):
        checkpoints.Config(checkpoints=("a",), settings={"TT": 3})
    with pytest.raises(ConfigError, match="analysis='bigram' cannot be swept. Use one of logit-lens, routes, sinks"):
        checkpoints.Config(analysis="bigram", checkpoints=("a",))


def test_sink_sweep_is_one_tidy_table_and_resumes(ckpt_dir, tmp_path):
    cks = tuple(checkpoints.checkpoints_in(ckpt_dir))
    cfg = checkpoints.Config(analysis="sinks", checkpoints=cks, settings={"T": 32, "n_samples": 6, "mlp_ablation": False})
    out = tmp_path / "sweep"

    loaded = []

    def dies_on_second(ck):
        if loaded:
            raise KeyboardInterrupt  # the sweep is killed while on the second checkpoint
        loaded.append(ck.label)
        return load_model(ck.name, device="cpu")

    with pytest.raises(KeyboardInterrupt):
        checkpoints.run(cfg, out=out, load=dies_on_second)
    events = []
    res = checkpoints.run(cfg, out=out, device="cpu", progress=events.append)
    seen = [(e.info["checkpoint"], e.info["status"]) for e in events if e.phase == "checkpoints" and e.done]
    assert seen == [("step0", "skipped"), ("step500", "done"), ("step1000", "done")]
    assert [e.done for e in events if e.phase == "checkpoints"] == [0, 1, 2, 3]
    assert {e.phase for e in events} >= {"step500: measuring", "step1000: measuring"}  # each checkpoint's own phase
    df = res.to_frame()
    assert list(df.columns) == checkpoints.COLUMNS
    assert list(df["checkpoint"].unique()) == ["step0", "step500", "step1000"] and list(df["step"].unique()) == [0, 500, 1000]
    per = df[df.metric == "alpha"].groupby("checkpoint").size()
    assert (per == 2 * 4).all()  # L × H per checkpoint
    # each checkpoint's numbers are those of a direct run on that checkpoint
    direct = sinks.run(load_model(cks[1], device="cpu"), domain="prose", config=cfg.analysis_config())
    got = df[(df.checkpoint == "step500") & (df.metric == "sink_pct")]["value"].item()
    assert got == pytest.approx(direct.sink_pct())
    # different seeds -> different models -> the table tells them apart
    a = df[df.metric == "alpha"].pivot_table(index="checkpoint", columns=["layer", "head"], values="value")
    assert not torch.allclose(torch.tensor(a.loc["step0"].values), torch.tensor(a.loc["step500"].values))
    again = checkpoints.SweepResult.load(out)
    pd.testing.assert_frame_equal(again.frame, df)
    assert again.pivot("sink_pct_layer").shape == (3, 2)


def test_cli_sweep_logit_lens_and_errors(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "ll"
    code, stdout, err = run_cli(["run", "sweep", "logit-lens", "--checkpoint-dir", str(ckpt_dir), "--prompt", "hello there",
                                 "--device", "cpu", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert "(checkpoint step0, status done)" in err and "(checkpoint step1000, status done)" in err  # a line each
    res = checkpoints.SweepResult.load(out)
    assert set(res.frame.metric) == {"top1_agree", "p_final"} and len(res.frame) == 3 * 2 * 2
    last = res.frame[(res.frame.metric == "top1_agree") & (res.frame.layer == 1)]
    assert (last["value"] == 1.0).all()  # the last block's lens is the model's own prediction
    code, _, err = run_cli(["run", "sweep", "logit-lens", "--checkpoint-dir", str(ckpt_dir), "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2 and "already holds a Sonde result" in err and "--replace" in err  # never replaced unasked
    code, _, err = run_cli(["run", "sweep", "logit-lens", "--checkpoint-dir", str(ckpt_dir), "--device", "cpu", "--out", str(out),
                            "--replace"], capsys)
    assert code == 0 and "status skipped" not in err  # a different prompt is a different sweep: no stale parts
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("ll", "ckpts")]  # no <out>.parts or work folder beside it
    code, _, err = run_cli(["run", "sweep", "sinks", "--device", "cpu"], capsys)
    assert code == 2 and "exactly one of --checkpoints or --checkpoint-dir" in err
    code, _, err = run_cli(["run", "sweep", "sinks", "--checkpoints", f"{ckpt_dir}/step0,{tmp_path}/missing", "--set", "T=16",
                            "--set", "n_samples=2", "--set", "mlp_ablation=false", "--device", "cpu", "--out", str(tmp_path / "s")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "(checkpoint step0, status done)" in err  # the first checkpoint's line, then the error, last
    assert lines[-1].startswith("error: checkpoint 'missing'") and messages(err) == [lines[-1]]
