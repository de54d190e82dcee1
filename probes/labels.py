"""Component labels and graph node names: one grammar, parsed and written only here.

Labels name a part of one block (``L`` then the 0-based block index, then the part)::

    =========  ========  ==========================================================
    label      kind      part
    =========  ========  ==========================================================
    ``L5H3``   head      attention head 3 of block 5 (``blocks.5.attn.hook_z[:, :, 3]``)
    ``L5N17``  neuron    MLP hidden unit 17 of block 5 (``blocks.5.mlp.hook_post[..., 17]``)
    ``L5FFN``  ffn       the whole FFN (MLP) of block 5 (``blocks.5.hook_mlp_out``)
    ``L5``     layer     block 5 as a whole (axis ticks of per-layer plots; not parsed)
    =========  ========  ==========================================================

Parsing ignores case and surrounding spaces; writing gives the canonical upper-case form above, so
``format(parse(x))`` is the canonical spelling of ``x``. Route graphs use LLM-TT's node names
(``X0_t`` embedding at position t, ``A{l}_t`` residual after block l's attention, ``M{l}_t`` block l's
FFN, ``I{l}_t`` residual leaving block l), written by :func:`node_label` and read by :func:`parse_node`.

Every malformed or out-of-range label raises :class:`LabelError` (a :class:`ConfigError` and an
:class:`InputError`), whose message quotes the label and whose hint names the legal forms.

>>> parse_head("L5H3")
(5, 3)
>>> parse_label("l2n17")
Component(kind='neuron', layer=2, index=17)
>>> head_label(5, 3), neuron_label(2, 17), ffn_label(4)
('L5H3', 'L2N17', 'L4FFN')
"""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Literal, NamedTuple

from .errors import ConfigError, InputError

__all__ = [
    "Component", "ComponentKind", "LabelError", "COMPONENT_KINDS",
    "parse_label", "parse_head", "parse_neuron", "format_label", "head_label", "neuron_label", "ffn_label",
    "layer_label", "node_label", "parse_node",
]

ComponentKind = Literal["head", "neuron", "ffn"]
COMPONENT_KINDS: tuple[str, ...] = ("head", "neuron", "ffn")

_LABEL = re.compile(r"\s*L(\d+)(?:(H|N)(\d+)|(FFN))\s*", flags=re.I)
_NODE = re.compile(r"\s*([XAMI])(\d+)_(\d+)\s*")
_LETTER = {"head": "H", "neuron": "N"}
_FORMS = {
    "head": "heads L<layer>H<head> (e.g. L5H3)",
    "neuron": "neurons L<layer>N<neuron> (e.g. L2N17)",
    "ffn": "a block's FFN L<layer>FFN (e.g. L5FFN)",
}
_NOUNS = {"head": "head", "neuron": "neuron", "ffn": "FFN"}


class LabelError(ConfigError, InputError):
    """A head / neuron / FFN label or a graph node name is malformed or outside the model."""


class Component(NamedTuple):
    """A parsed label: ``kind``, ``layer`` and ``index`` (head or neuron index; ``None`` for an FFN)."""

    kind: str
    layer: int
    index: int | None

    def __str__(self) -> str:
        return format_label(self.kind, self.layer, self.index)


def _int(x: Any, what: str) -> int:
    try:
        return operator.index(x)  # ints, numpy ints and integer 0-d tensors; never silently a float
    except TypeError:
        raise LabelError(f"{what}={x!r} is not an integer.", hint=f"Pass the {what} as an int.") from None


def head_label(layer: int, head: int) -> str:
    """``(5, 3)`` -> ``"L5H3"``."""
    return f"L{_int(layer, 'layer')}H{_int(head, 'head')}"


def neuron_label(layer: int, neuron: int) -> str:
    """``(2, 17)`` -> ``"L2N17"``."""
    return f"L{_int(layer, 'layer')}N{_int(neuron, 'neuron')}"


def ffn_label(layer: int) -> str:
    """``4`` -> ``"L4FFN"`` (a block's whole FFN)."""
    return f"L{_int(layer, 'layer')}FFN"


def layer_label(layer: int) -> str:
    """``4`` -> ``"L4"`` (a block as a whole, e.g. a plot's axis tick)."""
    return f"L{_int(layer, 'layer')}"


def format_label(kind: str, layer: int, index: int | None = None) -> str:
    """The canonical label of a component: ``format_label("head", 5, 3)`` -> ``"L5H3"``."""
    if kind == "head":
        return head_label(layer, index)
    if kind == "neuron":
        return neuron_label(layer, index)
    if kind == "ffn":
        return ffn_label(layer)
    raise LabelError(f"unknown component kind {kind!r}.", hint=f"Use one of: {', '.join(COMPONENT_KINDS)}.")


def _noun(kinds: tuple[str, ...]) -> str:
    nouns = [_NOUNS[k] for k in kinds]
    return nouns[0] if len(nouns) == 1 else f"{', '.join(nouns[:-1])} or {nouns[-1]}"


def _hint(kinds: tuple[str, ...]) -> str:
    forms = [_FORMS[k] for k in kinds]
    return "Name " + (forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} and {forms[-1]}") + "."


def parse_label(label: str, kinds: Iterable[str] = ("head", "neuron"), info: Any = None, *, where: str = "") -> Component:
    """Parse a component label, checking it against a model when ``info`` (a ``ModelInfo`` or a probe) is given.

    Args:
        label: ``"L5H3"``, ``"L2N17"`` or ``"L5FFN"`` (any case, spaces around are ignored).
        kinds: the kinds accepted here (a subset of ``head``, ``neuron``, ``ffn``).
        info: ``probe.info`` (or the probe): layers must be < ``n_layers``, heads < ``n_heads``,
            neurons < ``d_mlp``.
        where: context appended to the error message, e.g. ``" in 'ablate:L5X3'"``.

    Raises:
        LabelError: the label is malformed, of a kind not accepted here, or outside the model.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in COMPONENT_KINDS]
    if unknown or not kinds:
        raise LabelError(f"kinds={kinds!r} is not a set of component kinds.", hint=f"Use some of: {', '.join(COMPONENT_KINDS)}.")
    m = _LABEL.fullmatch(label) if isinstance(label, str) else None
    kind = None if m is None else "ffn" if m.group(4) else "head" if m.group(2).upper() == "H" else "neuron"
    if kind not in kinds:
        raise LabelError(f"unknown {_noun(kinds)} label {label!r}{where}.", hint=_hint(kinds))
    c = Component(kind, int(m.group(1)), None if kind == "ffn" else int(m.group(3)))
    info = getattr(info, "info", info)
    if info is not None:
        if c.layer >= info.n_layers:
            raise LabelError(f"{_NOUNS[kind]} {label.strip()}{where}: layer {c.layer} does not exist "
                             f"({info.name} has {info.n_layers} layers).", hint=f"Use a layer in 0..{info.n_layers - 1}.")
        n = {"head": info.n_heads, "neuron": info.d_mlp}.get(kind)
        if n is not None and c.index >= n:
            raise LabelError(f"{kind} {label.strip()}{where}: {kind} {c.index} does not exist "
                             f"({info.name} has {n} {kind}s per layer).", hint=f"Use a {kind} index in 0..{n - 1}.")
    return c


def parse_head(label: str, info: Any = None, *, where: str = "") -> tuple[int, int]:
    """``"L5H3"`` -> ``(5, 3)`` (checked against ``info`` when given); see :func:`parse_label`."""
    c = parse_label(label, ("head",), info, where=where)
    return c.layer, c.index


def parse_neuron(label: str, info: Any = None, *, where: str = "") -> tuple[int, int]:
    """``"L2N17"`` -> ``(2, 17)`` (checked against ``info`` when given); see :func:`parse_label`."""
    c = parse_label(label, ("neuron",), info, where=where)
    return c.layer, c.index


def node_label(kind: Literal["X", "A", "M", "I"], layer: int, pos: int) -> str:
    """LLM-TT graph node name: ``X0_t`` (embedding), ``A{l}_t``, ``M{l}_t``, ``I{l}_t``; ``layer`` is ignored for ``X``."""
    if kind not in ("X", "A", "M", "I"):
        raise LabelError(f"unknown node kind {kind!r}.", hint="Use X (embedding), A (after attention), M (FFN) or I (after the block).")
    return f"X0_{_int(pos, 'pos')}" if kind == "X" else f"{kind}{_int(layer, 'layer')}_{_int(pos, 'pos')}"


def parse_node(name: str) -> tuple[str, int, int]:
    """``"A3_7"`` -> ``("A", 3, 7)`` (an ``X`` node's layer is 0)."""
    m = _NODE.fullmatch(name) if isinstance(name, str) else None
    if m is None or (m.group(1) == "X" and m.group(2) != "0"):
        raise LabelError(f"unknown graph node {name!r}.",
                         hint="Nodes are X0_<pos>, A<layer>_<pos>, M<layer>_<pos> or I<layer>_<pos> (e.g. A3_7).")
    return m.group(1), int(m.group(2)), int(m.group(3))
