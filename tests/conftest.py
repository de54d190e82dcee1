from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct behind the nnsight backend (loaded once per session)."""
    from probes import load_model

    return load_model("embedded", backend="nnsight", device="cpu")


@pytest.fixture(scope="session")
def embedded_tl():
    """The embedded model behind the TransformerLens backend (its own model object)."""
    from probes import load_model

    return load_model("embedded", backend="transformer_lens", device="cpu")


@pytest.fixture
def tiny():
    """Factory: ``tiny("llama", backend="nnsight")`` -> probe around a fresh tiny random model."""
    return tiny_models.probe


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (tiny matmuls on a shared 2-core box run far slower with threads fighting)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setenv("SONDE_RESULTS", str(d))
    return d


@pytest.fixture
def run_page():
    """Run a dashboard page headless: ``run_page("routes.py")`` -> the finished AppTest."""
    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    def _run(file: str, timeout: float = 120):
        at = AppTest.from_file(str(root / "dashboard" / "pages" / file), default_timeout=timeout)
        return wait_background(at.run(), timeout=240)

    return _run


def run_cli(args, capsys):
    """Run the `sonde` CLI in-process: (exit code, stdout, stderr)."""
    from analyses.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def wait_background(at, timeout: float = 240):
    """Re-run an AppTest while a page shows a background run's progress bar (the run finishes in a thread)."""
    import time

    deadline = time.time() + timeout
    while at.get("progress") and not at.exception and time.time() < deadline:
        time.sleep(0.5)
        at.run()
    return at
