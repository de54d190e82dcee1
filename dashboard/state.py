"""Dashboard state: the sidebar's model choice, cached probes and cached results.

Pages call :func:`sidebar_probe` to get the probe the user chose (loaded once per (model, backend,
device, dtype) and shared across sessions, so at most two stay in memory) and
:func:`cached` to memoise an analysis call by its arguments. Pages never touch hooks: they call
``analyses.<method>.run`` and render the result.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from probes import BACKENDS, Probe, SondeError

__all__ = ["sidebar_probe", "get_probe", "cached", "show_error", "DEFAULT_PROMPT", "query_param", "model_lock"]

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_MODEL = os.environ.get("SONDE_MODEL", "embedded")


@st.cache_resource(max_entries=2, show_spinner=False)
def get_probe(model: str, backend: str, device: str, dtype: str) -> Probe:
    """Load (once) and share a probe. Probes are used read-only by pages, so sharing is thread-safe
    for reads; runs that edit activations do so inside one call."""
    from probes import load_model

    return load_model(model, backend=backend, device=device, dtype=dtype)


@st.cache_resource(show_spinner=False)
def model_lock() -> threading.RLock:
    """One lock around forward passes: background runs (dashboard.workbench) and page computations share
    probes, whose hooks must not interleave. Background runs take it per step, so a page waits at most one step."""
    return threading.RLock()


def query_param(name: str, default: str) -> str:
    """A page setting from the URL (``?prompt=...``) so a pasted link reproduces the view."""
    v = st.query_params.get(name)
    return v if v else default


def _ensure_navigation() -> None:
    """Make a link straight to a page (``/routes?...``) on a fresh server run dashboard/app.py.

    Streamlit runs an app that has a ``pages/`` folder next to its main script in the legacy multipage mode
    (each page file alone, file names in the sidebar) until some session has called ``st.navigation``. A pasted
    link to a page other than the first would then miss app.py's navigation and layout. Switching the flag off
    and rerunning runs app.py, whose ``st.navigation`` opens the same page with the same query string.
    """
    import sys

    if "streamlit.testing.v1.app_test" in sys.modules:  # AppTest re-reads the pages folder every run and drives pages by file
        return
    try:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner import get_script_run_ctx
    except ImportError:  # another Streamlit layout: nothing to fix
        return
    ctx = get_script_run_ctx()
    main = getattr(getattr(ctx, "pages_manager", None), "main_script_path", "") or ""
    if PagesManager.uses_pages_directory and Path(main).name == "app.py" and Path(main).parent.name == "dashboard":
        PagesManager.uses_pages_directory = False
        st.rerun()


def sidebar_probe() -> Probe | None:
    """Render the model selector in the sidebar and return the loaded probe (None after an error)."""
    _ensure_navigation()
    with st.sidebar:
        st.markdown("### Model")
        model = st.text_input("Model", value=query_param("model", DEFAULT_MODEL),
                              help="'embedded' (SmolLM2-135M-Instruct, offline), an HF id, a local folder, or a .gguf file.",
                              key="sonde_model")
        backend = st.selectbox("Backend", BACKENDS, index=BACKENDS.index(query_param("backend", "nnsight")), key="sonde_backend")
        device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="sonde_device")
        dtype = st.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"], key="sonde_dtype")
    st.query_params["model"] = model
    try:
        with st.spinner(f"Loading {model}…"):
            probe = get_probe(model.strip(), backend, device, dtype)
    except SondeError as e:
        show_error(e)
        return None
    with st.sidebar:
        i = probe.info
        st.caption(f"{i.family} · {i.n_layers} layers · {i.n_heads} heads ({i.n_kv_heads} KV) · d={i.d_model} · "
                   f"{i.n_params / 1e6:.0f}M params · {i.device} · {i.dtype}")
    return probe


def show_error(e: Exception) -> None:
    """One clear message for a user-fixable error."""
    st.error(str(e), icon="⚠️")


def _stored_folder(key: tuple) -> "Path":
    import hashlib
    from pathlib import Path

    from analyses import store as _store

    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    return _store.results_root() / "dashboard" / f"{key[0].split('.')[-1]}-{key[1].split('.')[-1]}-{digest}"


def cached(fn: Callable[..., Any], *args: Any, _probe: Probe | None = None, _store: bool = False, **kwargs: Any) -> Any:
    """Memoise ``fn(probe, *args, **kwargs)`` per session by (function, model fingerprint, arguments).

    Arguments must be hashable by their repr (configs are frozen dataclasses). Errors are shown and
    ``None`` is returned. With ``_store=True`` a result (an ``analyses.base.Result``) is also written to the
    results store under ``<results root>/dashboard/`` and read back from there by later sessions (a pasted link
    shows the saved result instead of recomputing it).
    """
    key = (fn.__module__, fn.__qualname__, _probe.info.fingerprint if _probe else None, _probe.backend if _probe else None,
           repr(args), repr(sorted(kwargs.items())))
    store = st.session_state.setdefault("_sonde_cache", {})
    if key not in store:
        folder = _stored_folder(key) if _store else None
        if folder is not None and (folder / "manifest.json").is_file():
            try:
                from analyses.base import load_result

                store[key] = load_result(folder)
                st.session_state.setdefault("_sonde_loaded", set()).add(str(folder))
            except Exception:  # noqa: BLE001 - an unreadable folder (older format): recompute
                pass
        if key not in store:
            try:
                with model_lock():
                    store[key] = fn(_probe, *args, **kwargs) if _probe is not None else fn(*args, **kwargs)
            except SondeError as e:
                show_error(e)
                return None
            if folder is not None and hasattr(store[key], "save"):
                try:
                    store[key].save(folder)
                except Exception:  # noqa: BLE001 - a read-only results folder must not break the page
                    pass
        if len(store) > 32:  # bounded: drop the oldest
            store.pop(next(iter(store)))
    if _store:
        folder = _stored_folder(key)
        if str(folder) in st.session_state.get("_sonde_loaded", set()):
            st.caption(f"Loaded from the results store: `{folder}`")
    return store[key]
