from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# results a test saves to the default store stay in the checkout (tests/_artifacts), never in the user's store
os.environ.setdefault("SONDE_RESULTS", str(Path(__file__).resolve().parents[1] / "tests" / "_artifacts" / "results"))
sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (`make test` runs one process per core) each process, and every process it starts (notebook
# kernels, CLI runs), gets its share of the cores as torch threads, and idle OpenMP workers sleep instead of spinning:
# two processes spinning on two cores wait for each other (a notebook ran 7x slower). Set before torch loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import chromium  # noqa: E402
import tiny_models  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one process per core, at most 4, and at most one per 4 GB of available memory (a process holds the
    embedded model behind both backends and starts notebook kernels and CLI runs: about 3 GB at its peak)."""
    avail_gb = None
    try:
        with open("/proc/meminfo") as f:
            avail_gb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration, ValueError):
        pass
    n = min(os.cpu_count() or 1, 4)
    return max(1, min(n, int(avail_gb // 4))) if avail_gb is not None else n


# Files whose tests take longest, run first so that parallel processes end together (`make test` passes
# --no-loadscope-reorder, so pytest-xdist hands out files in this order).
LONG_FIRST = ("tests/test_cluster.py", "notebooks/", "tests/test_planner.py", "tests/test_browser")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, p in enumerate(LONG_FIRST) if path.startswith(p)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the order within a file, and among the other files, is kept


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct behind the nnsight backend (loaded once per session)."""
    from probes import load_model

    return load_model("embedded", backend="nnsight", device="cpu")


@pytest.fixture(scope="session")
def embedded_adapter(embedded, tmp_path_factory):
    """A LoRA adapter of the embedded model (r 4 on q, v and o; B drawn N(0, 0.02) with seed 0, as a trained
    adapter's B is non-zero) saved by PEFT as safetensors: ``(folder, PEFT's unmerged logits of ADAPTER_PROMPT)``."""
    import torch

    from probes.weights import LoraSpec

    folder = tmp_path_factory.mktemp("adapter") / "lora-qvo"
    torch.manual_seed(0)
    with embedded.adapted(LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"))) as ad:
        for name, p in ad.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        ad.save(folder)
        with torch.no_grad():
            ref = ad.logits(embedded.to_tokens(ADAPTER_PROMPT)).double()
    return folder, ref


ADAPTER_PROMPT = "The Eiffel Tower is in"


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
def tiny_dir(tmp_path_factory):
    """A tiny random llama saved as a local model folder (safetensors + tokenizer), for CLI runs by path."""
    d = tmp_path_factory.mktemp("tiny") / "llama"
    model, tok = tiny_models.build("llama")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


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
        at = AppTest.from_file(str(root / "dashboard" / "views" / file), default_timeout=timeout)
        return wait_background(at.run(), timeout=240)

    return _run


# a progress line of the CLI in a log: "<phase>: <done>[/<total>][ <unit>], <m:ss> elapsed[, ETA ...][ (figures)]"
PROGRESS_LINE = re.compile(r"^(.+?): (\d+)(?:/(\d+))?(?: [a-z][a-z ]*)?, \d+:\d\d(?::\d\d)? elapsed")


def messages(err: str) -> list[str]:
    """stderr's lines other than progress lines (warnings, errors, the planner's line)."""
    return [line for line in err.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


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
    """Re-run an AppTest while a page shows a background run's progress bar, or holds a run not finished yet (a run
    still queued shows no bar; the run finishes in a thread)."""
    import time

    def busy() -> bool:
        jobs = at.session_state["_sonde_jobs"] if "_sonde_jobs" in at.session_state else {}
        return bool(at.get("progress")) or any(not getattr(j, "finished", True) for j in jobs.values())

    deadline = time.time() + timeout
    reran = False
    while busy() and not at.exception and time.time() < deadline:
        time.sleep(0.5)
        at.run()
        reran = True
    if not reran and "_sonde_jobs" in at.session_state and not at.exception:
        at.run()  # the page ran before its run finished (it was queued): the run that shows the result
    return at


# ----------------------------------------------------------------------------- headless Chromium (tests/chromium.py)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded):
    if not Path(chromium.CHROMIUM).is_file():
        pytest.skip(f"{chromium.CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    results = tmp_path_factory.mktemp("browser-results")
    # one saved result for the Results page (the session's embedded probe is already loaded by other tests)
    from analyses import logit_lens

    logit_lens.run(embedded, "Hello world", config=logit_lens.Config(layers=(0, 10, 20, 29), k=3)).save(results / "hello")
    env = {**os.environ, "SONDE_RESULTS": str(results), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = _free_port()
    log_path = tmp_path_factory.mktemp("browser-log") / "streamlit.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dashboard.serve", "--server.address", "127.0.0.1",  # what `sonde dashboard` runs
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=chromium.ROOT, env={**env, "SONDE_MODEL": "embedded"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"streamlit did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "results": results, "log": log_path, "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium.CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
