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

__all__ = ["download_figure", "download_frame", "notebook_snippet", "frame_to_parquet", "figure_to_html", "safe_name", "export_bar", "axis_titles", "readable", "p_value_table"]


def safe_name(name: str) -> str:
    """A file-name-safe stem (letters, digits, ``-_.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sonde"


def figure_to_html(fig: Any) -> bytes:
    """A self-contained interactive HTML file of a plotly figure (plotly.js inlined, works offline)."""
    from analyses.core.report import figure_bytes

    return figure_bytes(fig, "html")


def frame_to_parquet(df: Any) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def axis_titles(fig: Any, x: str | None = None, y: str | None = None, y2: str | None = None) -> Any:
    """Give a figure's axes titles where they have none (analysis figures built for notebooks leave some out)."""
    if x and not (fig.layout.xaxis.title and fig.layout.xaxis.title.text):
        fig.update_xaxes(title_text=x, selector=dict(anchor="y") if y2 else None)
    if y and not (fig.layout.yaxis.title and fig.layout.yaxis.title.text):
        fig.update_layout(yaxis_title=y)
    if y2 is not None and "yaxis2" in fig.layout and not (fig.layout.yaxis2.title and fig.layout.yaxis2.title.text):
        fig.update_layout(yaxis2_title=y2)
    return fig


def _cell(v: Any, digits: int) -> Any:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return ("∞" if v > 0 else "−∞") if math.isinf(v) else f"{v:.{digits}f}"
    if isinstance(v, str) and v and not v.strip():  # a whitespace token: make it visible
        return v.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    return v


def readable(df: Any, *, digits: int = 3) -> Any:
    """A table for display: missing values as "—", infinities as "∞", whitespace tokens made visible ("␣", "⏎").
    Float columns holding a missing or infinite value become text (``digits`` decimals); others keep their type."""
    import numpy as np

    out = df.copy()
    for c in out.columns:
        col = out[c]
        if col.dtype.kind == "f":
            if not np.isfinite(col.to_numpy()).all():
                out[c] = [_cell(float(v), digits) for v in col]
        elif col.dtype.kind not in "biufcmM":  # text and object columns
            out[c] = [_cell(v, digits) for v in col]
    return out


def token_chip(t: str) -> str:
    """A token as a Markdown code chip, ``repr`` quoted (so whitespace shows), with no-break spaces inside: the chip
    never wraps in the middle (a line of chips used to break ``' comprom'`` after its quote)."""
    return "`" + repr(t).replace(" ", "\u00a0") + "`"


def p_value_table(df: Any, columns: Any, *, labels: dict[str, str] | None = None, helps: dict[str, str] | None = None,
                  width: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(data, column_config)`` for ``st.dataframe`` showing the p-value ``columns`` of ``df`` as
    :func:`analyses.core.report.format_p` writes them: "9.00e-37", an exact 0 (underflow) as "< 1e-300", "∞", "—".

    A column of finite values stays numeric (sorting by it sorts by p); one holding an exact 0 keeps its numbers
    and shows them through a Styler; one with a missing or infinite value becomes text. Each column's header help
    says how to read it (``helps``: what the column is), ``labels`` renames headers, ``width`` sets their width (px)."""
    import numpy as np

    from analyses.core.report import P_FLOOR_NOTE, format_p

    labels, helps = labels or {}, helps or {}
    out, config, zero = df, {}, []
    for c in [c for c in columns if c in df.columns]:
        v = df[c].to_numpy(dtype=float, na_value=np.nan)
        help_ = " ".join(x for x in (helps.get(c), P_FLOOR_NOTE) if x)
        if not np.isfinite(v).all():
            out = out.assign(**{c: [format_p(x) for x in v]})
            config[c] = st.column_config.TextColumn(labels.get(c, c), help=help_, width=width)
            continue
        config[c] = st.column_config.NumberColumn(labels.get(c, c), format="%.2e", help=help_, width=width)
        if (v == 0).any():
            zero.append(c)
    if zero:  # the numbers stay (sorting works), their text comes from format_p
        out = out.style.format({c: format_p for c in zero})
    return out, config


def download_figure(fig: Any, name: str, *, key: str | None = None) -> None:
    """A download button for a figure as interactive HTML (built only when clicked)."""
    stem = safe_name(name)
    st.download_button("Download chart (HTML)", data=lambda: figure_to_html(fig), file_name=f"{stem}.html", mime="text/html", on_click="ignore",
                       key=key or f"dl-fig-{stem}", icon=":material/download:")


def download_frame(df: Any, name: str, *, key: str | None = None) -> None:
    """Two download buttons for a table: CSV and Parquet, side by side (``df`` may be a function building it on click)."""
    stem = safe_name(name)
    frame = df if callable(df) else (lambda: df)
    with st.container(horizontal=True, gap="small"):
        st.download_button("Download table (CSV)", data=lambda: frame().to_csv(index=False).encode("utf-8"), file_name=f"{stem}.csv",
                           mime="text/csv", on_click="ignore", key=(key or f"dl-df-{stem}") + "-csv", icon=":material/download:",
                           width="content")
        st.download_button("Download table (Parquet)", data=lambda: frame_to_parquet(frame()), file_name=f"{stem}.parquet",
                           mime="application/octet-stream", on_click="ignore", key=(key or f"dl-df-{stem}") + "-parquet",
                           icon=":material/download:", width="content")


LONG_LITERAL = 240  # characters: a longer string literal (a long prompt) is shortened on screen


def short_code(code: str) -> tuple[str, int]:
    """``code`` with each string literal over :data:`LONG_LITERAL` characters cut to its start and a comment saying
    how long it is (highlighting a 3,000-token prompt stalled the browser for seconds); and how many were cut."""
    import io
    import tokenize

    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return code, 0
    lines = code.splitlines(keepends=True)
    cuts = [t for t in toks if t.type == tokenize.STRING and t.start[0] == t.end[0] and len(t.string) > LONG_LITERAL]
    for t in reversed(cuts):  # right to left, so earlier columns stay valid
        row, (a, b) = t.start[0] - 1, (t.start[1], t.end[1])
        q = t.string[-1]
        lit = t.string[: 80] + "…" + q
        lines[row] = lines[row][:a] + lit + lines[row][b:].rstrip("\n") + f"  # cut here: {len(t.string):,} characters in the download\n"
    return "".join(lines), len(cuts)


def notebook_snippet(code: str, *, title: str = "Reproduce in a notebook", expanded: bool = False) -> None:
    """A collapsible box with the Python that reproduces the current view (long literals shortened on screen; the
    full code is a download then)."""
    shown, cut = short_code(code.strip("\n"))
    with st.expander(title, expanded=expanded, icon=":material/code:"):
        st.code(shown, language="python")
        if cut:
            st.download_button("Full code (.py)", data=code.strip("\n") + "\n", file_name="sonde_view.py", mime="text/x-python",
                               on_click="ignore", icon=":material/download:", width="content", key=f"code-{title}")


def export_bar(name: str, *, figure: Any = None, table: Any = None, result: Any = None, graph: Any = None,
               graph_position: int | None = None, figures: dict[str, Any] | None = None, tables: dict[str, Any] | None = None,
               notes: tuple[str, ...] = (), code: str | None = None, key: str | None = None) -> None:
    """One row of exports for the current view: chart (HTML/PNG/SVG), table (CSV/Parquet), route graph (GraphML)
    and a one-file HTML report of ``result`` with its manifest. Every file is built only when its button is clicked.

    ``graph`` is a routes result (its route to ``graph_position`` goes to GraphML); ``figures``/``tables`` go into
    the report (default: ``figure`` and ``table``).
    """
    from analyses.core import report

    stem = safe_name(name)
    k = key or f"exp-{stem}"
    buttons: list[tuple[str, Any, str, str, str | None]] = []  # (label, data, file, mime, disabled reason)
    if figure is not None:
        why = report.static_export_available()
        buttons += [("Chart HTML", lambda: report.figure_bytes(figure, "html"), f"{stem}.html", "text/html", None),
                    ("PNG", lambda: report.figure_bytes(figure, "png"), f"{stem}.png", "image/png", why),
                    ("SVG", lambda: report.figure_bytes(figure, "svg"), f"{stem}.svg", "image/svg+xml", why)]
    if table is not None:
        buttons += [("CSV", lambda: report.table_bytes(table, "csv"), f"{stem}.csv", "text/csv", None),
                    ("Parquet", lambda: report.table_bytes(table, "parquet"), f"{stem}.parquet", "application/octet-stream", None)]
    if graph is not None:
        buttons.append(("GraphML", lambda: report.graphml_bytes(graph, graph_position), f"{stem}.graphml", "application/xml", None))
    if result is not None:
        figs = figures if figures is not None else ({name: figure} if figure is not None else None)
        tabs = tables if tables is not None else ({name: table} if table is not None else None)
        buttons.append(("Report", lambda: report.html_report(result, figures=figs, tables=tabs, notes=notes, code=code),
                        f"{stem}-report.html", "text/html", None))
    if not buttons:
        return
    # one row that wraps: each button as wide as its label (equal columns cut labels to "Chart HT…" in a narrow window)
    with st.container(horizontal=True, gap="small", key=f"{k}-bar"):
        for label, data, file, mime, why in buttons:
            st.download_button(label, data=data, file_name=file, mime=mime, on_click="ignore", key=f"{k}-{label.lower().replace(' ', '-')}",
                               icon=":material/description:" if label == "Report" else ":material/download:", width="content",
                               disabled=why is not None, help=why or f"Download {file}", type="primary" if label == "Report" else "secondary")
