"""``python -m dashboard.serve [streamlit options]``: what ``sonde dashboard`` runs.

Starts warming the default model (:mod:`dashboard.warm`) in a background thread, then hands over to
Streamlit's own command line (``streamlit run dashboard/app.py [options]``) in this process, so the
model is loaded while the browser is opened (warming starts once the server listens, so it never delays it).
``SONDE_NO_WARM=1`` skips the warming (the page then loads the model when it first asks).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def _option(args: list[str], name: str, default: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` among Streamlit's options."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def _listening(host: str, port: int, timeout: float = 120) -> None:
    """Return once ``host:port`` accepts connections (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)


def address_problem(host: str, port: int | str) -> str | None:
    """Why the server could not listen on ``host:port`` (one line), or None: a port that is not a number in
    1..65535, a host that does not resolve, an address that is not this machine's, a port already in use."""
    try:
        port = int(str(port).strip())
    except ValueError:
        return f"port {port!r} is not a number."
    if not 1 <= port <= 65535:
        return f"port {port} is not a TCP port (1..65535)."
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as e:
        return f"host {host!r} is not an address or a host name that resolves ({getattr(e, 'strerror', None) or e})."
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror or e})."
    return None


def main(argv: list[str] | None = None) -> None:
    from dashboard import warm

    args = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP workers sleep instead of spinning (unless OMP_WAIT_POLICY is set): the browser usually shares the
    # machine, and spinning workers fight it for the cores. On 2 cores the first page's forward pass took 3.1 s
    # spinning and 0.2 s sleeping while Chromium drew the page (benchmarks/RESULTS.md, 2026-12-02). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    problem = address_problem(_option(args, "--server.address", "127.0.0.1"), _option(args, "--server.port", "8501"))
    if problem:  # one line instead of the server's traceback
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if os.environ.get("SONDE_NO_WARM", "") in ("", "0"):
        host = _option(args, "--server.address", "127.0.0.1")
        port = int(_option(args, "--server.port", "8501"))
        # warming starts once the server listens: it shares the interpreter, and must not delay the server's start
        warm.start(warm.default_key(),
                   after=lambda: _listening("127.0.0.1" if host in ("", "0.0.0.0") else host, port))
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *args]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
