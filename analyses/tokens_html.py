"""Token strips as HTML: a sequence of tokens drawn one span each, for dashboard pages and HTML reports.

:func:`token_strip` is the one renderer: it escapes each token's text and hover title, makes line breaks visible
(``⏎``) while keeping spaces, and highlights tokens that changed (against a reference text), a marked token (e.g.
the critical token of a trace) and a start boundary (e.g. where an edit begins). Nothing here imports streamlit;
the result is a self-contained ``<div>`` (inline styles only) for ``st.markdown(..., unsafe_allow_html=True)`` or
an HTML file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Token", "token_strip", "visible", "CHANGED", "CHIP"]

CHANGED = "#f4a261"  # background of a token that differs from the reference
CHIP = "rgba(49,51,63,0.08)"  # background of a chip without a colour of its own
MARK = "2px solid #d62728"  # border of a marked token
START = "2px dashed #c0392b"  # left border of the token where something starts


@dataclass(frozen=True)
class Token:
    """One token of a strip: its text, hover ``title`` (plain text), an optional CSS ``background`` colour, and flags:
    ``changed`` (differs from a reference: highlighted), ``marked`` (framed) and ``start`` (a dashed left border)."""

    text: str
    title: str = ""
    background: str | None = None
    changed: bool = False
    marked: bool = False
    start: bool = False


def visible(text: str) -> str:
    """A token's text with its line breaks made visible (``⏎``); spaces are kept (the strip preserves them)."""
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")


def _span(t: Token, chips: bool) -> str:
    style = ["border-radius:3px", "padding:1px 2px"]
    if chips:
        style = ["display:inline-block", "margin:2px", "padding:1px 6px", "border-radius:6px"]
    bg = CHANGED if t.changed else t.background if t.background is not None else CHIP if chips else None
    if bg:
        style.append(f"background:{bg}")
    if t.marked:
        style.append(f"border:{MARK}")
    if t.start:
        style.append(f"border-left:{START}")
    title = f" title='{html.escape(t.title, quote=True)}'" if t.title else ""
    return f"<span{title} style='{html.escape(';'.join(style), quote=True)}'>{html.escape(visible(t.text), quote=True)}</span>"


def token_strip(tokens: Iterable[Token], *, chips: bool = False) -> str:
    """An HTML ``<div>`` with one span per token: running text (``chips=False``: tokens side by side, so the strip
    reads as the text) or separate chips (``chips=True``: token boundaries visible, uncoloured chips grey)."""
    sep = " " if chips else ""
    body = sep.join(_span(t, chips) for t in tokens)
    return f"<div style='font-family:monospace;line-height:2;white-space:pre-wrap'>{body}</div>"
