"""Exports: charts, tables, route graphs and a one-file HTML report of any result.

* :func:`figure_bytes` — a plotly figure as ``html`` (self-contained, plotly.js inlined, always available),
  ``png`` or ``svg`` (static images through kaleido, which drives a headless Chrome; Debian's
  ``/usr/bin/chromium`` is used when no other browser is configured).
* :func:`write_html` — a figure written to an ``.html`` file that opens offline (atomically; every HTML file the CLI
  and the dashboard produce goes through :func:`figure_bytes` or :func:`html_report`, never a CDN link).
* :func:`table_bytes` — a table as ``csv`` or ``parquet``.
* :func:`graphml_bytes` — a routes result's route (or full thresholded graph) as GraphML
  (:meth:`analyses.routes.RoutesResult.to_graphml`; networkx reads it back with ``read_graphml``).
* :func:`format_p` — a p-value as text, the way every table, label and CLI line shows it ("3.00e-5", "< 1e-300"
  for one that underflowed to 0, "∞", "—").
* :func:`html_report` — one self-contained HTML file: title, summary, figures (interactive), tables and the
  result's manifest (model, config, input hash, library versions, timings), the same fields a saved result's
  ``manifest.json`` holds.

Nothing here imports streamlit; the dashboard's download buttons call these functions.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import pandas as pd

from probes.errors import ConfigError, SondeError

from . import store

__all__ = ["FIGURE_FORMATS", "TABLE_FORMATS", "ExportError", "figure_bytes", "write_html", "table_bytes", "graphml_bytes",
           "manifest_of", "html_report", "static_export_available", "format_p", "P_FLOOR", "P_FLOOR_NOTE"]

FIGURE_FORMATS = ("html", "png", "svg")
TABLE_FORMATS = ("csv", "parquet")
P_FLOOR = "< 1e-300"  # how a p-value stored as exactly 0 is shown
P_FLOOR_NOTE = ("A p-value shown as “< 1e-300” was stored as exactly 0: the computation underflowed below the smallest "
                "positive double (about 5e-324), so the true value is tiny but not zero; “—” marks a missing value.")


def format_p(p: Any, digits: int = 2) -> str:
    """A p-value as text: scientific notation with ``digits`` decimals and an unpadded exponent ("3.00e-5",
    "1.00e+0", as the dashboard's number columns print it); an exact 0 (floating-point underflow, not a measured
    zero) as :data:`P_FLOOR`; ∞ as "∞"; a missing value (None, NaN) as "—"."""
    import math

    try:
        v = float(p)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return P_FLOOR
    mant, exp = f"{v:.{digits}e}".split("e")
    return f"{mant}e{exp[0]}{int(exp[1:])}"


CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
REPORT_ROWS = 500  # rows per table shown in a report (the CSV/Parquet export has them all)


class ExportError(SondeError):
    """A static image export could not run (kaleido or a Chrome browser missing)."""


def _chrome() -> str | None:
    for k in ("BROWSER_PATH", "CHROMIUM_PATH"):
        if os.environ.get(k) and Path(os.environ[k]).is_file():
            return os.environ[k]
    return next((c for c in CHROMIUM_CANDIDATES if Path(c).is_file()), None)


def static_export_available() -> str | None:
    """None when PNG/SVG export can run, else the reason (for a UI to show beside a disabled button)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG/SVG export needs kaleido (pip install kaleido); the HTML export works without it."
    if _chrome() is None:
        return ("PNG/SVG export needs a Chrome/Chromium browser for kaleido: install Debian's chromium "
                "(apt-get install chromium) or set BROWSER_PATH; the HTML export works without it.")
    return None


def figure_bytes(fig: Any, fmt: Literal["html", "png", "svg"] = "html", *, width: int | None = None,
                 height: int | None = None, scale: float = 2.0) -> bytes:
    """A plotly figure as bytes: ``html`` (interactive, offline), ``png`` or ``svg`` (kaleido + Chrome)."""
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"figure format {fmt!r} is not supported.", hint=f"Use one of {', '.join(FIGURE_FORMATS)}.")
    if fmt == "html":
        return _figure_html(fig, full=True).encode("utf-8")
    why = static_export_available()
    if why is not None:
        raise ExportError(f"cannot write a {fmt.upper()} image: {why.split(':', 1)[0]}.", hint=why)
    # kaleido v1 finds its browser through BROWSER_PATH (choreographer); point it at the system Chromium
    os.environ.setdefault("BROWSER_PATH", _chrome() or "")
    try:
        return fig.to_image(format=fmt, width=width, height=height, scale=scale if fmt == "png" else 1)
    except Exception as e:  # noqa: BLE001 - kaleido/choreographer raise many types; one clear error instead
        raise ExportError(f"the {fmt.upper()} export failed ({type(e).__name__}: {str(e)[:200]}).",
                          hint="Check that the browser at BROWSER_PATH starts headless; the HTML export works without it.") from e


def _figure_html(fig: Any, *, full: bool, plotlyjs: bool = True) -> str:
    """The one place plotly HTML is made: plotly.js inlined (``include_plotlyjs=True``), never loaded from a CDN."""
    return fig.to_html(include_plotlyjs=bool(plotlyjs), full_html=full)


def write_html(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a self-contained interactive HTML file (opens offline); the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=store.scratch_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(figure_bytes(fig, "html"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def table_bytes(df: pd.DataFrame, fmt: Literal["csv", "parquet"] = "csv") -> bytes:
    """A table as CSV (UTF-8, no index) or Parquet bytes."""
    if fmt not in TABLE_FORMATS:
        raise ConfigError(f"table format {fmt!r} is not supported.", hint=f"Use one of {', '.join(TABLE_FORMATS)}.")
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    # object columns with mixed types (e.g. None and bool) are stored as strings so Parquet accepts them
    safe = df.copy()
    for c in safe.columns:
        if safe[c].dtype == object:
            try:
                pd.DataFrame({c: safe[c]}).to_parquet(io.BytesIO(), index=False)
            except Exception:  # noqa: BLE001
                safe[c] = safe[c].astype(str)
    safe.to_parquet(buf, index=False)
    return buf.getvalue()


def graphml_bytes(routes_result: Any, position: int | None = None, *, full: bool = False) -> bytes:
    """A routes result's route to ``position`` (or the full thresholded graph) as GraphML bytes."""
    if not hasattr(routes_result, "to_graphml"):
        raise ConfigError(f"{type(routes_result).__name__} has no graph to export.",
                          hint="GraphML export takes an analyses.routes.RoutesResult (routes.run(...)).")
    with tempfile.TemporaryDirectory() as d:
        p = routes_result.to_graphml(Path(d) / "route.graphml", position, full=full)
        return Path(p).read_bytes()


def manifest_of(result: Any) -> dict[str, Any]:
    """The manifest of a result: read from its folder when given a path, else built like ``store.write_result``'s."""
    if isinstance(result, (str, Path)):
        return store.read_manifest(result)
    cfg = result.config.to_dict()
    return store._jsonable({
        "format": store.FORMAT_VERSION, "analysis": result.analysis, "key": result.key, "model": result.model,
        "config": cfg, "input_hash": result.input_hash, "versions": store.library_versions(),
        "device": str(result.model.get("device", "cpu")), "timings": dict(result.timings),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tables": sorted(result.tables()), "extra": result.extra(),
    })


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.9rem} table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left} th{background:#f4f6f8}
pre{background:#f7f7f9;padding:1rem;overflow:auto;font-size:.8rem;border-radius:6px}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem} dt{font-weight:600}
"""


def html_report(result: Any, *, figures: Mapping[str, Any] | Sequence[Any] | None = None,
                tables: Mapping[str, pd.DataFrame] | None = None, title: str | None = None,
                notes: Sequence[str] = (), code: str | None = None) -> bytes:
    """One self-contained HTML file (plotly.js inlined once, opens offline) describing ``result``.

    Args:
        result: a :class:`analyses.core.base.Result` or a saved result folder.
        figures: ``{caption: plotly figure}`` (or a list); default: ``result.plot()`` when it draws.
        tables: ``{name: DataFrame}``; default: ``result.tables()`` (the stored tables of a folder).
        title: the heading; default ``"<analysis> on <model>"``.
        notes: short paragraphs shown under the heading (e.g. the page settings).
        code: the Python that reproduces the view (shown verbatim).
    """
    man = manifest_of(result)
    loaded = result
    if isinstance(result, (str, Path)):
        stored = store.read_result(result)
        if tables is None:
            tables = stored.tables
        if figures is None:
            try:
                from .base import load_result

                loaded = load_result(result)
            except Exception:  # noqa: BLE001 - a report still shows tables and manifest
                loaded = None
    if tables is None:
        tables = loaded.tables() if loaded is not None else {}
    if figures is None:
        figures = {}
        try:
            fig = loaded.plot() if loaded is not None else None
        except (NotImplementedError, SondeError):
            fig = None
        if fig is not None:
            figures = {"": fig}
    if not isinstance(figures, Mapping):
        figures = {f"Figure {i + 1}": f for i, f in enumerate(figures)}

    model = man.get("model", {})
    title = title or f"{man.get('analysis')} on {model.get('name', '?')}"
    esc = _html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p class='meta'>Sonde report · analysis <b>{esc(str(man.get('analysis')))}</b> · model {esc(str(model.get('name')))} "
             f"({esc(str(model.get('family', '')))}, fingerprint {esc(str(model.get('fingerprint', ''))[:12])}) · "
             f"key {esc(str(man.get('key', '')))} · {esc(str(man.get('created_at', '')))}</p>"]
    for n in notes:
        parts.append(f"<p>{esc(n)}</p>")
    summary = man.get("extra", {}).get("summary")
    if isinstance(summary, Mapping) and summary:
        parts.append("<h2>Summary</h2><dl>" + "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(str(v))}</dd>" for k, v in summary.items())
                     + "</dl>")
    first = True
    for cap, fig in figures.items():
        parts.append(f"<h2>{esc(cap or 'Chart')}</h2>")
        parts.append(_figure_html(fig, full=False, plotlyjs=first))
        first = False
    pcols = set(_p_value_columns(man, loaded))
    for name, df in tables.items():
        if df is None or not len(df.columns):
            continue
        more = f" (first {REPORT_ROWS} of {len(df)} rows)" if len(df) > REPORT_ROWS else f" ({len(df)} rows)"
        parts.append(f"<h2>Table {esc(name)}{more}</h2>")
        head = df.head(REPORT_ROWS)
        ps = [c for c in head.columns if c in pcols]
        if ps:  # p-values as the pages print them: "9.00e-37", an exact 0 (underflow) as "< 1e-300", "∞", "—"
            head = head.assign(**{c: head[c].map(format_p) for c in ps})
            parts.append(f"<p class='meta'>{esc(P_FLOOR_NOTE)}</p>")
        parts.append(head.to_html(index=False, border=0, na_rep="", escape=True))
    if code:
        parts.append(f"<h2>Reproduce in a notebook</h2><pre>{esc(code.strip())}</pre>")
    parts.append("<h2>Manifest</h2><pre>" + esc(json.dumps(man, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts).encode("utf-8")


def _p_value_columns(man: Mapping[str, Any], loaded: Any) -> tuple[str, ...]:
    """The p-value columns the result's class declares (:attr:`Result.p_value_columns`), found from the loaded result
    or, for a folder that does not load, from the analysis the manifest names."""
    cols = getattr(type(loaded), "p_value_columns", None) if loaded is not None else None
    if cols is None:
        try:
            from . import registry

            cols = getattr(registry.get(str(man.get("analysis"))).result, "p_value_columns", ())
        except Exception:  # noqa: BLE001 - an unknown analysis prints its numbers plainly
            cols = ()
    return tuple(cols)


def html_page(title: str, *, facts: Mapping[str, Any] | None = None, figures: Mapping[str, Any] | None = None,
              tables: Mapping[str, pd.DataFrame] | None = None) -> bytes:
    """One self-contained HTML page that is not one result's report (e.g. two routes compared): a heading, a list
    of facts, the figures (plotly.js inlined once, opens offline) and the tables (first :data:`REPORT_ROWS` rows)."""
    esc = _html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if facts:
        parts.append("<dl>" + "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(str(v))}</dd>" for k, v in facts.items()) + "</dl>")
    for i, (cap, fig) in enumerate((figures or {}).items()):
        parts.append(f"<h2>{esc(cap or 'Chart')}</h2>")
        parts.append(_figure_html(fig, full=False, plotlyjs=i == 0))
    for name, df in (tables or {}).items():
        parts.append(f"<h2>{esc(name)}</h2>")
        parts.append(df.head(REPORT_ROWS).to_html(index=False, border=0, na_rep="", escape=True))
    parts.append("</body></html>")
    return "\n".join(parts).encode("utf-8")
