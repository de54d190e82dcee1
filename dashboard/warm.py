"""Start-up warming: load the default model while the Streamlit server starts and the browser connects.

``sonde dashboard`` runs :mod:`dashboard.serve`, which calls :func:`start` before handing over to
Streamlit. A background thread imports the heavy libraries (torch, transformers, nnsight, plotly, the
analyses) and loads the default probe; :func:`take` hands that probe to the dashboard's probe cache
(``dashboard.state.get_probe``) the first time a page asks for the same model, waiting for the load if it
is still running. A failed warm load is dropped silently: the page then loads the model itself and shows
the error the usual way. Without :func:`start` (AppTest, ``streamlit run``) nothing is preloaded.

Imports are not thread-safe across packages with import cycles (a second thread can see a partially
initialised module), so the libraries both sides use (numpy, pandas, pyarrow) are imported before the thread
starts, and the app waits for the thread's imports (:func:`wait_imports`) before a page imports anything heavy.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["start", "take", "wait_imports", "preload_plotly", "end_preload", "default_key", "DEFAULT_KEY"]

# (model, backend, device, dtype) of a fresh session's context (dashboard.state builds its defaults from it)
DEFAULT_KEY = ("embedded", "nnsight", "auto", "auto")


def default_key() -> tuple:
    """:data:`DEFAULT_KEY` with the model a fresh session opens on (``$SONDE_MODEL``, else the embedded one)."""
    return (os.environ.get("SONDE_MODEL", DEFAULT_KEY[0]), *DEFAULT_KEY[1:])

_lock = threading.Lock()
_pending: dict[tuple, Future] = {}
_imported = threading.Event()
_imported.set()  # nothing to wait for until start() runs


def wait_imports(timeout: float = 300) -> None:
    """Block until the warming thread's imports are done (at once when nothing is warming)."""
    _imported.wait(timeout)


def _load(key: tuple, fut: Future, after: Callable[[], None] | None) -> None:
    try:
        try:
            if after is not None:
                after()
            import analyses.logit_lens  # noqa: F401  (the first page's analysis)
            import probes.backend, probes.loading  # noqa: E401,F401  (torch, transformers; `probes` itself is lazy)
            from probes import load_model
        finally:
            _imported.set()

        model, backend, device, dtype = key
        probe = load_model(model, backend=backend, device=device, dtype=dtype)
        probe.forward(probe.to_tokens("Hello"))  # first-call allocations and kernel selection
        fut.set_result(probe)
    except BaseException as e:  # noqa: BLE001 - the page loads (and reports) on its own
        fut.set_exception(e)


def start(key: tuple = DEFAULT_KEY, *, after: Callable[[], None] | None = None) -> None:
    """Begin loading ``key``'s probe in a daemon thread (once per process per key); the thread first calls
    ``after()`` (e.g. wait until the server listens, so warming never delays the server's start)."""
    import numpy, pandas, pyarrow, plotly.graph_objects  # noqa: E401,F401  (shared with the server: imported here, before the thread)

    with _lock:
        if key in _pending:
            return
        fut: Future = Future()
        _pending[key] = fut
        _imported.clear()
    threading.Thread(target=_load, args=(key, fut, after), name="sonde-warm", daemon=True).start()


_run = threading.local()  # per script run (Streamlit runs each session's script in its own thread): the preload slot


def preload_plotly() -> None:
    """Have the browser fetch and start plotly.js while the first model loads: Streamlit loads that large chunk only
    with the first chart, which would otherwise wait for the model. Draws an empty chart, hidden, in the sidebar, in
    each run of a session until a model is loaded (:func:`end_preload` removes it)."""
    import streamlit as st

    _run.slot = None
    if st.session_state.get("_sonde_plotly_loaded"):
        return
    import plotly.graph_objects as go  # imported by start() before the warming thread, or by nothing else in flight

    _run.slot = st.sidebar.empty()
    with _run.slot.container(key="sonde_plotly_preload"):
        st.html("<style>.st-key-sonde_plotly_preload{display:none}</style>")
        st.plotly_chart(go.Figure(layout={"height": 40, "width": 40}), key="sonde_plotly_preload_chart",
                        config={"staticPlot": True, "displayModeBar": False})


def end_preload(*, loaded: bool) -> None:
    """Remove :func:`preload_plotly`'s chart from this run (every page calls this once its model question is settled:
    hidden or not, a leftover chart would be the page's first); with ``loaded`` (a model is in) the session stops
    drawing it: its tab has plotly.js by now."""
    import streamlit as st

    if loaded:
        st.session_state["_sonde_plotly_loaded"] = True
    slot, _run.slot = getattr(_run, "slot", None), None
    if slot is not None:
        slot.empty()


def take(key: tuple) -> Any | None:
    """The preloaded probe for ``key`` (waiting for a load in flight), or None. Each probe is handed out once."""
    with _lock:
        fut = _pending.pop(key, None)
    if fut is None:
        return None
    try:
        return fut.result()
    except BaseException:  # noqa: BLE001
        return None
