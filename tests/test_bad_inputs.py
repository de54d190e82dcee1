"""Bad CLI input, verb by verb: exit status 2, exactly one ``error:`` line, no traceback, nothing
left behind and nothing of the user's touched.

Every case runs in-process (``conftest.run_cli``) in a fresh folder holding a small user tree (a
thesis, a CSV in a sub-folder, a plain file, an existing Sonde result, damaged inputs). After the
command the folder must hold exactly what it held before, byte for byte. Cases fail before a model
loads, or load a tiny random model saved to a folder once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import messages, run_cli

from analyses.core import store

LONG = "word " * 400  # more tokens than the tiny model's 128 positions


def _user_tree(ws: Path) -> None:
    (ws / "user" / "sub").mkdir(parents=True)
    (ws / "user" / "thesis.txt").write_text("three years of work\n")
    (ws / "user" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (ws / "file.txt").write_text("keep me\n")
    (ws / "file.safetensors").write_bytes(b"not really safetensors, but the user's")
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{bad json\n')
    (ws / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (ws / "empty.jsonl").write_text("\n\n")
    store.write_result(ws / "result", analysis="demo", model={"name": "m", "fingerprint": "f"}, config={}, input_hash="h",
                       tables={"main": pd.DataFrame({"a": [1]})})
    for name, manifest in (("listmanifest", [1, 2]), ("escape", None)):
        (ws / name).mkdir()
        if manifest is not None:
            (ws / name / "manifest.json").write_text(json.dumps(manifest))
    m = json.loads((ws / "result" / "manifest.json").read_text())
    m["tables"] = ["../../x"]
    (ws / "escape" / "manifest.json").write_text(json.dumps(m))
    (ws / "lookalike").mkdir()  # a hand-written manifest beside the user's notes: not a Sonde result
    (ws / "lookalike" / "manifest.json").write_text('{"analysis": "x"}')
    (ws / "lookalike" / "notes.txt").write_text("mine\n")


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = f"dir {oct(p.stat().st_mode & 0o777)}"
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


NO_GPU = not torch.cuda.is_available()

# (id, argv with {ws} = the user's folder and {tiny} = a tiny model folder, a fragment of the error line)
CASES = [
    # --- info: models, devices, dtypes, backends
    ("info-unknown-model-offline", ["info", "-m", "nobody/no-such-model"], "not in the local Hugging Face cache"),
    ("info-folder-not-a-model", ["info", "-m", "{ws}/user"], "not a model folder"),
    ("info-missing-gguf", ["info", "-m", "{ws}/missing.gguf"], "does not exist"),
    ("info-bad-dtype", ["info", "-m", "{tiny}", "--dtype", "float8"], "float8"),
    ("info-bad-backend", ["info", "-m", "{tiny}", "--backend", "tensorflow"], "tensorflow"),
    ("info-bad-device", ["info", "-m", "{tiny}", "--device", "tpu"], "tpu"),
    ("info-revision-embedded", ["info", "--revision", "nosuchrev"], "the embedded model has no revisions"),
    ("info-revision-local-folder", ["info", "-m", "{tiny}", "--revision", "v1"], "has no revisions"),
    ("info-bad-max-memory", ["info", "-m", "{tiny}", "--device-map", "auto", "--max-memory", "lots"], "lots"),
    pytest.param("info-cuda-without-gpu", ["info", "-m", "{tiny}", "--device", "cuda"], "cuda",
                 marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is present")),
    # --- capture: output files and hooks
    ("capture-out-not-safetensors", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.0.hook_resid_post",
                                     "--out", "{ws}/acts.txt"], "must end in .safetensors"),
    ("capture-out-exists", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.0.hook_resid_post",
                            "--out", "{ws}/file.safetensors"], "already exists"),
    ("capture-out-user-file-replace", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.0.hook_resid_post",
                                       "--out", "{ws}/file.safetensors", "--replace"], "not a file Sonde wrote"),
    ("capture-out-unwritable", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.0.hook_resid_post",
                                "--out", "/proc/sonde-test/acts.safetensors"], "cannot write"),
    ("capture-no-prompt", ["capture", "-m", "{tiny}", "--hooks", "blocks.0.hook_resid_post", "--out", "{ws}/a.safetensors"],
     "exactly one of --prompt or --input"),
    ("capture-unknown-hook", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.0.hook_nonsense",
                              "--out", "{ws}/a.safetensors"], "hook_nonsense"),
    ("capture-hook-layer-out-of-range", ["capture", "-m", "{tiny}", "--prompt", "hi", "--hooks", "blocks.99.hook_resid_post",
                                         "--out", "{ws}/a.safetensors"], "99"),
    ("capture-missing-input", ["capture", "-m", "{tiny}", "--input", "{ws}/missing.jsonl", "--hooks", "blocks.0.hook_resid_post",
                               "--out", "{ws}/a.safetensors"], "does not exist"),
    ("capture-malformed-jsonl", ["capture", "-m", "{tiny}", "--input", "{ws}/bad.jsonl", "--hooks", "blocks.0.hook_resid_post",
                                 "--out", "{ws}/a.safetensors"], "bad.jsonl line 2 is not valid JSON"),
    ("capture-missing-hooks", ["capture", "-m", "{tiny}", "--prompt", "hi", "--out", "{ws}/a.safetensors"], "--hooks"),
    # --- logit-lens: prompts, numbers, --out
    ("lens-empty-prompt", ["run", "logit-lens", "-m", "{tiny}", "--prompt", ""], "empty"),
    ("lens-whitespace-prompt", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "   "], "empty"),
    ("lens-over-long-prompt", ["run", "logit-lens", "-m", "{tiny}", "--prompt", LONG], "128"),
    ("lens-k-zero", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--k", "0"], "k=0"),
    ("lens-k-negative", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--k", "-3"], "k=-3"),
    ("lens-k-not-a-number", ["run", "logit-lens", "--prompt", "hi", "--k", "five"], "--k"),
    ("lens-layer-out-of-range", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--layers", "99"], "99"),
    ("lens-layers-garbage", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--layers", "a-b"], "a-b"),
    ("lens-out-user-folder", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/user"], "not a Sonde result"),
    ("lens-out-user-folder-replace", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/user", "--replace"], "not a Sonde result"),
    ("lens-out-is-file", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/file.txt"], "is a file"),
    ("lens-out-parent-is-file", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/file.txt/res"], "is not a folder"),
    ("lens-out-read-only-fs", ["run", "logit-lens", "--prompt", "hi", "--out", "/proc/sonde-test/res"], "cannot write"),
    ("lens-out-lookalike-replace", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/lookalike", "--replace"],
     "not written by Sonde"),
    ("lens-out-existing-result", ["run", "logit-lens", "--prompt", "hi", "--out", "{ws}/result"], "--replace"),
    ("lens-html-unwritable", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--out", "{ws}/new",
                              "--html", "{ws}/file.txt/x.html"], "--html"),
    ("lens-html-exists", ["run", "logit-lens", "-m", "{tiny}", "--prompt", "hi", "--html", "{ws}/file.txt"], "--html"),
    ("routes-graphml-exists", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--graphml", "{ws}/file.txt"], "--graphml"),
    ("lens-unknown-option", ["run", "logit-lens", "--frobnicate"], "--frobnicate"),
    # --- routes
    ("routes-tau-too-big", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--tau", "1.5"], "tau"),
    ("routes-tau-nan", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--tau", "nan"], "tau"),
    ("routes-bad-level", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--level", "galaxy"], "galaxy"),
    ("routes-malformed-jsonl-stop", ["run", "routes", "-m", "{tiny}", "--input", "{ws}/bad.jsonl"], "bad.jsonl line 2 is not valid JSON"),
    ("routes-non-utf8", ["run", "routes", "-m", "{tiny}", "--input", "{ws}/latin.txt"], "not UTF-8"),
    ("routes-missing-file", ["run", "routes", "-m", "{tiny}", "--input", "{ws}/missing.jsonl"], "does not exist"),
    ("routes-empty-file", ["run", "routes", "-m", "{tiny}", "--input", "{ws}/empty.jsonl"], "no prompts"),
    ("routes-bad-head-label", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--ablate", "L5X3"], "L5X3"),
    ("routes-head-out-of-range", ["run", "routes", "-m", "{tiny}", "--prompt", "hi there", "--ablate", "L99H0"], "99"),
    ("routes-bad-on-error", ["run", "routes", "-m", "{tiny}", "--input", "{ws}/bad.jsonl", "--on-error", "maybe"], "maybe"),
    ("routes-out-user-folder", ["run", "routes", "--prompt", "hi", "--out", "{ws}/user"], "not a Sonde result"),
    # --- sinks
    ("sinks-eps-zero", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--eps", "0"], "eps"),
    ("sinks-eps-nan", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--eps", "nan"], "eps"),
    ("sinks-T-negative", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--T", "-5"], "T=-5"),
    ("sinks-n-zero", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "-n", "0"], "n_samples=0"),
    ("sinks-bad-bos", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--bos", "sometimes"], "sometimes"),
    ("sinks-unknown-domain", ["run", "sinks", "-m", "{tiny}", "--domain", "poetry"], "poetry"),
    ("sinks-bad-engine", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--engine", "gpu"], "gpu"),
    ("sinks-bad-positions", ["run", "sinks", "-m", "{tiny}", "--domain", "prose", "--positions", "a,b"], "a,b"),
    ("sinks-out-is-file", ["run", "sinks", "--domain", "prose", "--out", "{ws}/file.txt"], "is a file"),
    # --- dormant
    ("dormant-theta-too-big", ["run", "dormant", "-m", "{tiny}", "--theta", "2"], "theta"),
    ("dormant-bad-head-label", ["run", "dormant", "-m", "{tiny}", "--heads", "L5X3"], "L5X3"),
    ("dormant-head-out-of-range", ["run", "dormant", "-m", "{tiny}", "--heads", "L99H0"], "L99H0"),
    ("dormant-bad-intervention", ["run", "dormant", "-m", "{tiny}", "--intervention", "explode"], "explode"),
    ("dormant-unknown-domain", ["run", "dormant", "-m", "{tiny}", "--domains", "poetry"], "poetry"),
    # --- bb-toy
    ("bbtoy-layers", ["run", "bb-toy", "--layers", "2"], "layers"),
    ("bbtoy-attention", ["run", "bb-toy", "--attention", "sigmoid"], "sigmoid"),
    ("bbtoy-steps-zero", ["run", "bb-toy", "--steps", "0"], "steps"),
    # --- bigram
    ("bigram-negative-lambda", ["run", "bigram", "-m", "{tiny}", "--lambda", "-1"], "lam=-1"),
    ("bigram-nan-lambda", ["run", "bigram", "-m", "{tiny}", "--lambda", "nan"], "lam"),
    ("bigram-steps-zero", ["run", "bigram", "-m", "{tiny}", "--steps", "0"], "steps"),
    ("bigram-final-beta-and-temp-mult", ["run", "bigram", "-m", "{tiny}", "--final-beta", "300", "--temp-mult", "1.01"], "both set"),
    ("bigram-final-beta-below-one", ["run", "bigram", "-m", "{tiny}", "--final-beta", "0.5"], "--final-beta 0.5"),
    ("bigram-bad-target", ["run", "bigram", "-m", "{tiny}", "--target", "trigram"], "trigram"),
    ("bigram-missing-corpus", ["run", "bigram", "-m", "{tiny}", "--corpus", "{ws}/missing.txt"], "missing.txt"),
    ("bigram-non-utf8-corpus", ["run", "bigram", "-m", "{tiny}", "--corpus", "{ws}/latin.txt"], "not UTF-8"),
    ("bigram-out-user-folder", ["run", "bigram", "--out", "{ws}/user"], "not a Sonde result"),
    ("bigram-eval-not-a-result", ["run", "bigram-eval", "--mask", "{ws}/user"], "not a Sonde result"),
    # --- fiber
    ("fiber-missing-matrix", ["run", "fiber", "-m", "{tiny}", "--matrix", "{ws}/missing.npy"], "missing.npy"),
    ("fiber-vol-min-zero", ["run", "fiber", "-m", "{tiny}", "--vol-min", "0"], "vol_min"),
    ("fiber-alpha-too-big", ["run", "fiber", "-m", "{tiny}", "--alpha", "2"], "alpha"),
    ("fiber-bad-correction", ["run", "fiber", "-m", "{tiny}", "--correction", "bonferroni"], "bonferroni"),
    ("fiber-bad-tokens", ["run", "fiber", "-m", "{tiny}", "--tokens", "abc"], "abc"),
    # --- critical / contrastive-train
    ("critical-rollouts-zero", ["run", "critical", "-m", "{tiny}", "--rollouts", "0"], "rollouts"),
    ("critical-unknown-task", ["run", "critical", "-m", "{tiny}", "--task", "nope"], "nope"),
    ("critical-bad-granularity", ["run", "critical", "-m", "{tiny}", "--granularity", "paragraph"], "paragraph"),
    ("critical-negative-temperature", ["run", "critical", "-m", "{tiny}", "--temperature", "-1"], "temperature"),
    ("contrastive-out-user-folder", ["run", "contrastive-train", "--out", "{ws}/user"], "not a Sonde result"),
    # --- counterfactual / bias-sweep
    ("cf-empty-prompt", ["run", "counterfactual", "-m", "{tiny}", "--prompt", ""], "empty"),
    ("cf-negative-temperature", ["run", "counterfactual", "-m", "{tiny}", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    ("cf-bad-noise", ["run", "counterfactual", "-m", "{tiny}", "--prompt", "hi", "--noise", "white"], "white"),
    ("cf-top-p-too-big", ["run", "counterfactual", "-m", "{tiny}", "--prompt", "hi", "--top-p", "2"], "top_p"),
    ("cf-missing-prompt", ["run", "counterfactual"], "--prompt"),
    ("bias-one-group", ["run", "bias-sweep", "-m", "{tiny}", "--groups", "man"], "group"),
    ("bias-template-without-slot", ["run", "bias-sweep", "-m", "{tiny}", "--template", "no slot here"], "{group}"),
    # --- plan / sweep
    ("plan-seq-len-over-context", ["plan", "sinks", "--seq-len", "100000", "--device", "cpu"], "context length of 8192"),
    ("plan-seq-len-zero", ["plan", "sinks", "--seq-len", "0", "--device", "cpu"], "--seq-len 0 is below 1"),
    ("plan-unknown-analysis", ["plan", "attention", "--device", "cpu"], "attention"),
    ("plan-bad-free", ["plan", "sinks", "--device", "cpu", "--free", "lots"], "lots"),
    ("plan-revision-embedded", ["plan", "sinks", "--device", "cpu", "--revision", "nosuchrev"], "no revisions"),
    ("plan-batch-zero", ["plan", "sinks", "--device", "cpu", "--batch-size", "0"], "--batch-size 0 is below 1"),
    ("sweep-no-checkpoints", ["run", "sweep", "sinks"], "exactly one of --checkpoints or --checkpoint-dir"),
    ("sweep-bad-analysis", ["run", "sweep", "bigram", "--checkpoints", "a"], "bigram"),
    ("sweep-missing-dir", ["run", "sweep", "sinks", "--checkpoint-dir", "{ws}/missing"], "not a folder"),
    ("sweep-dir-without-checkpoints", ["run", "sweep", "sinks", "--checkpoint-dir", "{ws}/user"], "holds no checkpoint"),
    ("sweep-bad-set", ["run", "sweep", "sinks", "--checkpoints", "{tiny}", "--set", "T"], "KEY=VALUE"),
    ("sweep-out-user-folder", ["run", "sweep", "sinks", "--checkpoints", "{tiny}", "--out", "{ws}/user"], "not a Sonde result"),
    # --- results
    ("results-show-not-a-result", ["results", "show", "{ws}/user"], "not a Sonde result"),
    ("results-show-list-manifest", ["results", "show", "{ws}/listmanifest"], "not a Sonde manifest"),
    ("results-show-escaping-table", ["results", "show", "{ws}/escape"], "not allowed"),
    ("results-show-missing", ["results", "show", "{ws}/missing"], "not a Sonde result"),
    ("results-ls-a-file", ["results", "ls", "{ws}/file.txt"], "not a folder"),
    ("dashboard-bad-port", ["dashboard", "--port", "eighty"], "--port"),
]


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c.values[0] if hasattr(c, "marks") else c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(name, argv, fragment, tmp_path, tiny_dir, capsys, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    _user_tree(ws)
    monkeypatch.setenv("SONDE_RESULTS", str(ws / "sonde-results"))
    monkeypatch.chdir(ws)
    before = _snapshot(tmp_path)
    args = [a.replace("{ws}", str(ws)).replace("{tiny}", str(tiny_dir)) for a in argv]
    code, out, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (name, code, err[-2000:])
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert fragment in errors[0], errors[0]
    assert _snapshot(tmp_path) == before  # no new entry anywhere, every user file byte-identical


def test_the_table_is_big_enough():
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------- good runs leave only their result
def test_skipped_line_is_one_warning_line(tmp_path, tiny_dir, capsys, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    _user_tree(ws)
    monkeypatch.chdir(ws)
    code, out, err = run_cli(["capture", "-m", str(tiny_dir), "--input", str(ws / "bad.jsonl"), "--on-error", "skip",
                              "--hooks", "blocks.0.hook_resid_post", "--out", str(ws / "acts.safetensors")], capsys)
    assert code == 0, err
    warn = messages(err)  # besides the progress lines of the capture
    assert warn == ["warning: bad.jsonl line 2 is not valid JSON (Expecting property name enclosed in double quotes at column 2); "
                    "skipped."], err
    # the capture file is Sonde's: --replace may overwrite it, and nothing else appeared
    code, _, err = run_cli(["capture", "-m", str(tiny_dir), "--prompt", "hi", "--hooks", "blocks.0.hook_resid_post",
                            "--out", str(ws / "acts.safetensors"), "--replace"], capsys)
    assert code == 0, err
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]


def test_bigram_with_out_writes_only_the_result(tmp_path, tiny_dir, capsys, monkeypatch):
    from analyses.core.io import work_dir

    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.delenv("SONDE_RESULTS", raising=False)
    out = ws / "mask"
    code, _, err = run_cli(["run", "bigram", "-m", str(tiny_dir), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                            "--eval-rows", "2", "--no-eval", "--lr", "0.05", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in ws.iterdir()) == ["mask"]  # no ./sonde-results/.bigram-progress
    probe = work_dir(out, "x")  # this run's checkpoint folder is gone from the per-user cache
    assert not list(probe.parent.glob(f"bigram-*-{probe.name.rsplit('-', 1)[1]}"))
    code, _, err = run_cli(["run", "bigram", "-m", str(tiny_dir), "--steps", "2", "--out", str(out)], capsys)
    assert code == 2 and err.count("error:") == 1 and "--replace" in err
