"""Dashboard state: the sidebar's model choice, cached probes and cached results.

Pages call :func:`sidebar_probe` to get the probe the user chose (loaded once per (model, backend,
device, dtype) and shared across sessions, so at most two stay in memory) and
:func:`cached` to memoise an analysis call by its arguments. Pages never touch hooks: they call
``analyses.<method>.run`` and render the result.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import streamlit as st

from probes import BACKENDS, Probe, SondeError

__all__ = ["sidebar_probe", "get_probe", "cached", "show_error", "DEFAULT_PROMPT", "query_param"]

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_MODEL = os.environ.get("SONDE_MODEL", "embedded")


@st.cache_resource(max_entries=2, show_spinner=False)
def get_probe(model: str, backend: str, device: str, dtype: str) -> Probe:
    """Load (once) and share a probe. Probes are used read-only by pages, so sharing is thread-safe
    for reads; runs that edit activations do so inside one call."""
    from probes import load_model

    return load_model(model, backend=backend, device=device, dtype=dtype)


def query_param(name: str, default: str) -> str:
    """A page setting from the URL (``?prompt=...``) so a pasted link reproduces the view."""
    v = st.query_params.get(name)
    return v if v else default


def sidebar_probe() -> Probe | None:
    """Render the model selector in the sidebar and return the loaded probe (None after an error)."""
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


def cached(fn: Callable[..., Any], *args: Any, _probe: Probe | None = None, **kwargs: Any) -> Any:
    """Memoise ``fn(probe, *args, **kwargs)`` per session by (function, model fingerprint, arguments).

    Arguments must be hashable by their repr (configs are frozen dataclasses). Errors are shown and
    ``None`` is returned.
    """
    key = (fn.__module__, fn.__qualname__, _probe.info.fingerprint if _probe else None, _probe.backend if _probe else None,
           repr(args), repr(sorted(kwargs.items())))
    store = st.session_state.setdefault("_sonde_cache", {})
    if key not in store:
        try:
            store[key] = fn(_probe, *args, **kwargs) if _probe is not None else fn(*args, **kwargs)
        except SondeError as e:
            show_error(e)
            return None
        if len(store) > 32:  # bounded: drop the oldest
            store.pop(next(iter(store)))
    return store[key]
