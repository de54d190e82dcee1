"""Dashboard start-up: seconds from `sonde dashboard` to the first chart drawn in a headless Chromium.

    python benchmarks/dashboard_start.py [--repeats 1] [--chromium /usr/bin/chromium]

Starts the CLI's `dashboard` verb on a free loopback port (embedded model, a fresh results folder), opens the
Model & prompt page in Playwright's Chromium and waits until plotly has drawn the logit-lens heat map. Prints the
seconds to the server's health check, to the first chart, and (as the same-run baseline) the seconds a plain
`python -c "import torch, transformers"` takes; runs alternate between the default warm start (the model loads
while the server starts, see dashboard/warm.py) and SONDE_NO_WARM=1. Goal: first chart within 10 s on 2 idle CPU cores once set-up
(the venv and the converted embedded model) is done. The machine's load average is printed with each run (on
a shared machine, compare the chart's time in units of the same-run import baseline).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(chromium: str, timeout: float, warm: bool = True, delay: float = 0.0) -> tuple[float, float, float]:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "SONDE_NO_WARM": "0" if warm else "1", "SONDE_RESULTS": tempfile.mkdtemp(prefix="sonde-bench-"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "from analyses.cli import main; main()", "dashboard", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    raise SystemExit(f"error: the dashboard did not start (exit {proc.poll()})")
                time.sleep(0.1)
        t_health = time.perf_counter() - t0
        time.sleep(delay)  # a user who opens the browser a while after starting the server
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = b.new_page(viewport={"width": 1400, "height": 1000})
                t_open = time.perf_counter()
                page.goto(url + "/", wait_until="domcontentloaded")
                # the logit-lens heat map itself (a hidden chart preloads plotly.js while the model loads: see dashboard.warm)
                page.wait_for_selector(".st-key-logit_lens_heatmap .js-plotly-plot .main-svg", timeout=timeout * 1000)
                t_chart = time.perf_counter() - t0
                t_after_open = time.perf_counter() - t_open
            finally:
                b.close()
        return t_health, t_chart, t_after_open
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--delay", type=float, default=20, help="for the second pair of runs: seconds between the server's start and opening the browser")
    a = ap.parse_args()
    if not Path(a.chromium).is_file():
        print(f"error: {a.chromium} is missing (apt-get install chromium)", file=sys.stderr)
        return 2
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
    t_import = time.perf_counter() - t
    runs: dict[tuple, list] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(a.repeats):  # alternate, so every mode sees the same machine load
        for delay in (0.0, a.delay):
            for warm in (True, False):
                runs.setdefault((warm, delay), []).append(once(a.chromium, a.timeout, warm, delay))
                loads.append(os.getloadavg()[0])
    print(f"CPU: {os.cpu_count()} cores; load average (1 min) between runs {min(loads):.1f}-{max(loads):.1f}")
    print(f"baseline: import torch, transformers {t_import:.1f} s")
    for (warm, delay), rs in runs.items():
        health = statistics.median(r[0] for r in rs)
        chart = statistics.median(r[1] for r in rs)
        after = statistics.median(r[2] for r in rs)
        what = ("warm start (default)" if warm else "SONDE_NO_WARM=1") + (f", browser opened {delay:.0f} s after start" if delay else "")
        print(f"{what}: server answers {health:.1f} s, first chart drawn {chart:.1f} s after start "
              f"({chart / t_import:.1f}x the import baseline; goal <= 10 s on 2 idle cores), {after:.1f} s after opening the page")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
