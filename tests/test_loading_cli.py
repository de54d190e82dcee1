"""Model loading and the foundation CLI verbs, including their error messages."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from probes import ConfigError, DeviceError, ModelLoadError, load_model
from probes.loading import embedded_gguf_path, embedded_model_dir
from conftest import run_cli


def test_embedded_cache_is_fast_and_identical(embedded):
    d = embedded_model_dir()
    assert (d / "config.json").is_file() and any(d.glob("*.safetensors"))
    assert embedded_gguf_path().suffix == ".gguf"
    t = time.perf_counter()
    again = load_model("embedded", device="cpu")
    assert time.perf_counter() - t < 5
    toks = embedded.to_tokens("Hello there")
    assert torch.equal(again.forward(toks), embedded.forward(toks))
    assert embedded.info.n_layers == 30 and embedded.info.n_heads == 9 and embedded.info.n_kv_heads == 3
    assert embedded.info.d_model == 576 and embedded.info.d_vocab == 49152


def test_load_errors():
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/tmp/definitely-missing.gguf")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(Path(__file__).parent))
    with pytest.raises(ConfigError, match="unknown backend"):
        load_model("embedded", backend="pyvene")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            load_model("embedded", device="cuda")


def test_fingerprint_is_the_content_not_the_folder(tmp_path):
    """The same weights saved in two folders have one fingerprint (so results keyed by it are found on every
    machine, whatever its cache path); other weights have another."""
    import tiny_models

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        m, tok = tiny_models.build("llama", seed)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    fa, fb, fc = (load_model(str(tmp_path / n), device="cpu").info.fingerprint for n in "abc")
    assert fa == fb != fc


def test_local_folder_refuses_pickle(tmp_path):
    import tiny_models

    m, tok = tiny_models.build("llama")
    m.save_pretrained(tmp_path / "ok")
    tok.save_pretrained(tmp_path / "ok")
    p = load_model(str(tmp_path / "ok"), device="cpu")
    assert p.info.family == "llama" and p.info.n_layers == 2
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save({}, tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled"):
        load_model(str(tmp_path / "pkl"))


def test_cli_info_json(capsys, embedded):
    code, out, _ = run_cli(["info", "--json", "--device", "cpu"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["n_layers"] == 30 and d["n_kv_heads"] == 3 and d["fingerprint"] == embedded.info.fingerprint


def test_cli_errors_are_one_line(capsys):
    code, out, err = run_cli(["info", "--model", "nobody/nothing"], capsys)
    assert code == 2 and err.startswith("error: model 'nobody/nothing'") and "Traceback" not in err
    code, _, err = run_cli(["capture", "--prompt", "", "--hooks", "blocks.0.hook_resid_pre", "--out", "x.safetensors"], capsys)
    assert code == 2 and "empty" in err
    code, _, err = run_cli(["capture", "--prompt", "hi", "--hooks", "blocks.99.hook_resid_pre", "--out", "x.safetensors"], capsys)
    assert code == 2 and "layers 0..29" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(["info", "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA GPU" in err


def test_cli_capture(tmp_path, capsys):
    from safetensors.torch import load_file

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "first prompt"}\n{"text": "second one here"}\n')
    out = tmp_path / "acts.safetensors"
    code, _, err = run_cli(["capture", "--input", str(src), "--hooks", "blocks.3.hook_resid_post,blocks.2.attn.hook_pattern",
                            "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    t = load_file(str(out))
    assert t["0/blocks.3.hook_resid_post"].shape[-1] == 576
    assert t["1/blocks.2.attn.hook_pattern"].shape[0] == 9
    assert set(k.split("/")[0] for k in t) == {"0", "1"}


def test_sonde_console_script_runs():
    exe = Path(sys.executable).parent / "sonde"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "run" in r.stdout and "dashboard" in r.stdout


def test_analyses_never_import_streamlit():
    code = "import sys, importlib, pkgutil, analyses, probes\n" \
           "for m in pkgutil.walk_packages(analyses.__path__, 'analyses.'): importlib.import_module(m.name)\n" \
           "for m in pkgutil.walk_packages(probes.__path__, 'probes.'): importlib.import_module(m.name)\n" \
           "assert 'streamlit' not in sys.modules, 'analyses/probes imported streamlit'\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_model_options_reach_the_loader(capsys):
    """Every model-loading verb takes --device-map/--max-memory/--revision/--remote (one decorator) and the
    loader answers bad combinations with one line."""
    from analyses.cli import main

    for argv, want in ((["info", "--max-memory", "0=1GiB"], "without device_map"),
                       (["run", "logit-lens", "--prompt", "x", "--max-memory", "cpu=1GiB"], "without device_map"),
                       (["run", "critical", "--remote"], "NDIF")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err and err.count("\n") == 1, (argv, err)
