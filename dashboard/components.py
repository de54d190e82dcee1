"""Small shared widgets for dashboard pages: downloads and the "reproduce in a notebook" box.

Pages call these after rendering a result::

    components.download_figure(fig, "logit-lens")
    components.download_frame(df, "logit-lens")
    components.notebook_snippet("from analyses import logit_lens\\n...")
"""

from __future__ import annotations

import io
import re
from typing import Any

import streamlit as st

__all__ = ["download_figure", "download_frame", "notebook_snippet", "frame_to_parquet", "figure_to_html", "safe_name"]


def safe_name(name: str) -> str:
    """A file-name-safe stem (letters, digits, ``-_.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sonde"


def figure_to_html(fig: Any) -> bytes:
    """A self-contained interactive HTML file of a plotly figure (plotly.js inlined, works offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")


def frame_to_parquet(df: Any) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def download_figure(fig: Any, name: str, *, key: str | None = None) -> None:
    """A download button for a figure as interactive HTML (built only when clicked)."""
    stem = safe_name(name)
    st.download_button("Download chart (HTML)", data=lambda: figure_to_html(fig), file_name=f"{stem}.html", mime="text/html", on_click="ignore",
                       key=key or f"dl-fig-{stem}", icon=":material/download:")


def download_frame(df: Any, name: str, *, key: str | None = None) -> None:
    """Two download buttons for a table: CSV and Parquet, side by side."""
    stem = safe_name(name)
    c1, c2 = st.columns(2)
    with c1:
        st.download_button("Download table (CSV)", data=lambda: df.to_csv(index=False).encode("utf-8"), file_name=f"{stem}.csv",
                           mime="text/csv", on_click="ignore", key=(key or f"dl-df-{stem}") + "-csv", icon=":material/download:")
    with c2:
        st.download_button("Download table (Parquet)", data=lambda: frame_to_parquet(df), file_name=f"{stem}.parquet",
                           mime="application/octet-stream", on_click="ignore", key=(key or f"dl-df-{stem}") + "-parquet", icon=":material/download:")


def notebook_snippet(code: str, *, title: str = "Reproduce in a notebook", expanded: bool = False) -> None:
    """A collapsible box with the Python that reproduces the current view."""
    with st.expander(title, expanded=expanded, icon=":material/code:"):
        st.code(code.strip("\n"), language="python")
