"""Interventions: small frozen specs applied to one site's tensor, the same way in every backend.

Every edit names a site and implements ``apply(x) -> x'`` on the tensor in the site's layout
(see :mod:`probes.sites`). Backends only locate the tensor and write the result back.

Examples::

    Ablate("blocks.5.attn.hook_z", heads=[3])                  # zero head L5H3's output
    Ablate("blocks.2.mlp.hook_post", neurons=[17], mode="mean", value=means)
    Patch("blocks.4.hook_resid_post", value=other_run_resid, positions=[7])
    AddVector("blocks.6.hook_resid_post", vector=steer, scale=4.0)
    AttendTo(layer=3, heads=[0, 2], key=0)                      # move the heads' attention to key 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from .errors import ConfigError
from .labels import parse_head  # re-exported: the head grammar lives in probes.labels
from .sites import Site, parse_site, site

__all__ = ["Edit", "Ablate", "Patch", "AddVector", "AttendTo", "ZeroAttention", "parse_head", "as_edits"]


def _idx(v: Sequence[int] | int | None) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v,)
    return tuple(int(i) for i in v)


@dataclass(frozen=True)
class Edit:
    """Base class: an intervention at one site."""

    site: str | Site

    @property
    def target(self) -> Site:
        return parse_site(self.site)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pos_index(self, x: torch.Tensor, positions, axis: int):
        if positions is None:
            return slice(None)
        T = x.shape[axis]
        bad = [p for p in positions if not -T <= p < T]
        if bad:
            raise ConfigError(f"{type(self).__name__} positions {bad} are outside the sequence (length {T}).")
        return list(positions)


def _check_range(name: str, chosen: Sequence[int] | None, n: int, edit: "Edit") -> None:
    bad = [i for i in (chosen or ()) if not -n <= i < n]
    if bad:
        raise ConfigError(f"{type(edit).__name__} at {edit.target.name}: {name} {bad} out of range; the site has {name} 0..{n - 1}.")


# axis of heads / positions / features for each site kind's layout
_HEAD_AXIS = {"q": 2, "k": 2, "v": 2, "z": 2, "result": 2, "pattern": 1}
_POS_AXIS = {"pattern": 2}


@dataclass(frozen=True)
class Ablate(Edit):
    """Replace activations by zero (``mode="zero"``) or by given means (``mode="mean"``, ``value``).

    Selectors combine: ``heads`` (per-head sites), ``neurons`` (last axis, e.g. ``mlp.hook_post``),
    ``positions`` (token axis). ``value`` for mean ablation broadcasts against the selected slice's
    full tensor (e.g. a per-position mean [T, H, h] for ``hook_z``).
    """

    heads: Sequence[int] | int | None = None
    neurons: Sequence[int] | int | None = None
    positions: Sequence[int] | int | None = None
    mode: Literal["zero", "mean"] = "zero"
    value: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.mode not in ("zero", "mean"):
            raise ConfigError(f"Ablate mode={self.mode!r}; use 'zero' or 'mean'.")
        if self.mode == "mean" and self.value is None:
            raise ConfigError("Ablate(mode='mean') needs value= (the mean activation to write).")
        if self.heads is not None and self.target.kind not in _HEAD_AXIS:
            raise ConfigError(f"Ablate heads= needs a per-head site ({', '.join(_HEAD_AXIS)}), got {self.target.name}.")

    def apply(self, x):
        kind = self.target.kind
        pos_axis = _POS_AXIS.get(kind, 1)
        p = self._pos_index(x, _idx(self.positions), pos_axis)
        sel = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        selectors = [(pos_axis, None if isinstance(p, slice) else p), (_HEAD_AXIS.get(kind), _idx(self.heads)),
                     (x.ndim - 1, _idx(self.neurons))]
        for (axis, chosen), what in zip(selectors, ("positions", "heads", "features")):
            if chosen is None:
                continue
            _check_range(what, chosen, x.shape[axis], self)
            m = torch.zeros(x.shape[axis], dtype=torch.bool, device=x.device)
            m[list(chosen)] = True
            sel &= m.view(*[-1 if i == axis else 1 for i in range(x.ndim)])
        repl = torch.zeros_like(x) if self.mode == "zero" else self.value.to(x.device, x.dtype).expand_as(x)
        return torch.where(sel, repl, x)


@dataclass(frozen=True)
class Patch(Edit):
    """Write ``value`` (same layout as the site, e.g. from another run) at ``positions`` (all if None)."""

    value: torch.Tensor = field(default=None, compare=False)
    positions: Sequence[int] | int | None = None

    def apply(self, x):
        v = self.value.to(x.device, x.dtype)
        pos_axis = _POS_AXIS.get(self.target.kind, 1)
        p = self._pos_index(x, _idx(self.positions), pos_axis)
        out = x.clone()
        if isinstance(p, slice):
            if v.shape[pos_axis] != x.shape[pos_axis] if v.ndim == x.ndim else False:
                raise ConfigError(f"Patch value has {v.shape[pos_axis]} positions; the run has {x.shape[pos_axis]}.")
            return v.expand_as(x).clone()
        idx = [slice(None)] * x.ndim
        idx[pos_axis] = list(p)
        src = v[tuple(idx)] if v.ndim == x.ndim and v.shape[pos_axis] == x.shape[pos_axis] else v
        out[tuple(idx)] = src
        return out


@dataclass(frozen=True)
class AddVector(Edit):
    """Add ``scale * vector`` (shape [d] or broadcastable) at ``positions`` (all if None)."""

    vector: torch.Tensor = field(default=None, compare=False)
    positions: Sequence[int] | int | None = None
    scale: float = 1.0

    def apply(self, x):
        v = self.vector.to(x.device, x.dtype) * self.scale
        p = self._pos_index(x, _idx(self.positions), 1)
        if isinstance(p, slice):
            return x + v
        out = x.clone()
        out[:, list(p)] = out[:, list(p)] + v
        return out


@dataclass(frozen=True)
class AttendTo(Edit):
    """Set the attention rows of ``heads`` in ``layer`` to one-hot on ``key`` ("move attention to the sink")."""

    site: str | Site = ""
    layer: int = 0
    heads: Sequence[int] | int | None = None
    key: int = 0

    def __post_init__(self):
        object.__setattr__(self, "site", site("pattern", self.layer).name)

    def apply(self, x):
        out = x.clone()
        heads = _idx(self.heads)
        _check_range("heads", heads, x.shape[1], self)
        h = slice(None) if heads is None else list(heads)
        T = x.shape[-1]
        if not -T <= self.key < T:
            raise ConfigError(f"AttendTo key={self.key} is outside the sequence (length {T}).")
        out[:, h] = 0.0
        out[:, h, :, self.key] = 1.0
        return out


@dataclass(frozen=True)
class ZeroAttention(Edit):
    """Set the attention weights of ``heads`` in ``layer`` to zero (the head writes nothing)."""

    site: str | Site = ""
    layer: int = 0
    heads: Sequence[int] | int | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", site("pattern", self.layer).name)

    def apply(self, x):
        out = x.clone()
        heads = _idx(self.heads)
        _check_range("heads", heads, x.shape[1], self)
        out[:, slice(None) if heads is None else list(heads)] = 0.0
        return out


def as_edits(edits: "Edit | str | Sequence[Edit | str] | None", info=None, *, where: str = "edits") -> list[Edit]:
    """Every spelling of an intervention that Sonde's entry points accept, as a list of :class:`Edit`.

    ``edits`` is an :class:`Edit`, a component label or ``"ablate:<label>"`` (``L5H3``: zero head 5.3's output;
    ``L5N17``: zero MLP neuron 5.17; ``L5FFN``: zero block 5's MLP output), or a list/tuple of these; ``None``
    means none. Labels are checked against ``info`` (a ``ModelInfo`` or a probe) when it is given. Anything else
    raises one :class:`probes.errors.InputError` naming the legal forms.
    """
    from .errors import InputError
    from .labels import parse_label

    if edits is None:
        return []
    items = [edits] if isinstance(edits, (Edit, str)) else edits
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{where} must be a list of edits, got {type(edits).__name__}.",
                         hint="E.g. edits=[Ablate('blocks.5.attn.hook_z', heads=[3])] or edits=['L5H3'].")
    out: list[Edit] = []
    for e in items:
        if isinstance(e, Edit):
            out.append(e)
            continue
        if not isinstance(e, str):
            raise InputError(f"{where} holds {type(e).__name__} {e!r}, which is not an edit.",
                             hint="Use Edit objects (Ablate, Patch, AddVector, AttendTo, ZeroAttention) or labels such as 'L5H3'.")
        text = e.strip()
        text = text[len("ablate:"):] if text.lower().startswith("ablate:") else text
        c = parse_label(text, ("head", "neuron", "ffn"), info, where=f" in {where}")
        if c.kind == "head":
            out.append(Ablate(site("z", c.layer).name, heads=[c.index]))
        elif c.kind == "neuron":
            out.append(Ablate(site("mlp_post", c.layer).name, neurons=[c.index]))
        else:
            out.append(Ablate(site("mlp_out", c.layer).name))
    return out
