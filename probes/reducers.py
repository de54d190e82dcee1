"""Streaming reducers: statistics computed inside hooks, one batch at a time.

A reducer has three operations:

* ``update(x)`` folds one batch of activations into its state (called inside the hook, so the
  batch is never kept);
* ``merge(other)`` combines two partial states (from two shards, two workers, two processes);
* ``finalize()`` returns the statistic.

Merging partial states gives the same answer as one pass over all the data, up to float
rounding, so a corpus never has to fit in memory and shards can be reduced on different workers
(``state()`` / ``from_state()`` move a partial state between processes as plain tensors).

Axis convention: a reducer is told which dimensions of the incoming tensor to reduce (``dims``);
the remaining dimensions make the shape of the statistic and must be the same on every update.
Accumulators are kept in float64 on the device of the first update and moved to the CPU only by
``finalize``/``state``.

Example::

    norms = Mean(dims=(0,), transform=l2_norm)      # [B, T, d] -> per-position mean norm [T]
    probe.run(tokens, reads={"blocks.3.hook_resid_post": norms})
    norms.finalize()
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

__all__ = [
    "Reducer",
    "Mean",
    "Sum",
    "Max",
    "Min",
    "Moments",
    "Histogram",
    "TopK",
    "Collect",
    "l2_norm",
    "reducer_from_state",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis (a named function so reducers stay picklable)."""
    return x.float().norm(dim=-1)


def _norm_dims(dims: Sequence[int] | int | None, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ConfigError(f"reducer dims={tuple(dims)} do not fit a tensor with {ndim} axes.")
        out.append(d % ndim)
    return tuple(sorted(set(out)))


class Reducer:
    """Base class. Subclasses implement ``_update``, ``_merge`` and ``finalize``.

    Args:
        dims: axes of the incoming tensor to reduce over (default: axis 0, the batch).
        transform: function applied to the incoming tensor before reduction (e.g. ``l2_norm``).
    """

    kind: str = "reducer"

    def __init__(self, dims: Sequence[int] | int | None = (0,), transform: Transform | None = None):
        self.dims = dims
        self.transform = transform
        self.n_updates = 0

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.transform is not None:
            x = self.transform(x)
        self._update(x)
        self.n_updates += 1

    def merge(self, other: "Reducer") -> "Reducer":
        if type(other) is not type(self):
            raise ConfigError(f"cannot merge {type(other).__name__} into {type(self).__name__}.")
        if other.n_updates == 0:
            return self
        if self.n_updates == 0:
            self.load_state(other.state())
            return self
        self._merge(other)
        self.n_updates += other.n_updates
        return self

    def finalize(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Plain, picklable partial state (tensors on the CPU)."""
        st = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in self._state().items()}
        st["__kind__"] = type(self).__name__
        st["__n_updates__"] = self.n_updates
        return st

    def load_state(self, st: dict[str, Any]) -> None:
        st = dict(st)
        st.pop("__kind__", None)
        self.n_updates = int(st.pop("__n_updates__", 0))
        for k, v in st.items():
            setattr(self, k, v)

    def empty_like(self) -> "Reducer":
        """A fresh reducer with the same settings and no data (for shards and workers)."""
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k in self._settings()})
        new._reset()
        return new

    # -- helpers --------------------------------------------------------------------------
    def _settings(self) -> tuple[str, ...]:
        return ("dims", "transform")

    def _reset(self) -> None:
        self.n_updates = 0

    def _state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _merge(self, other: "Reducer") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_shape(self, name: str, have: torch.Tensor | None, new: torch.Tensor) -> None:
        if have is not None and have.shape != new.shape:
            raise ConfigError(
                f"{type(self).__name__}: the kept axes changed shape between updates "
                f"({tuple(have.shape)} then {tuple(new.shape)}); reduce over the varying axis "
                f"(dims=...) or use equal-length batches."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dims={self.dims}, updates={self.n_updates})"


class Sum(Reducer):
    """Sum over ``dims``; also counts the reduced elements."""

    def __init__(self, dims=(0,), transform=None):
        super().__init__(dims, transform)
        self._reset()

    def _reset(self):
        super()._reset()
        self.total: torch.Tensor | None = None
        self.count = 0

    def _update(self, x):
        d = _norm_dims(self.dims, x.ndim)
        s = x.to(torch.float64).sum(dim=d) if d else x.to(torch.float64)
        self._check_shape("total", self.total, s)
        self.total = s if self.total is None else self.total + s.to(self.total.device)
        self.count += math.prod(x.shape[i] for i in d) if d else 1

    def _merge(self, other):
        self._check_shape("total", self.total, other.total)
        self.total = self.total + other.total.to(self.total.device)
        self.count += other.count

    def _state(self):
        return {"total": self.total, "count": self.count}

    def finalize(self) -> torch.Tensor:
        if self.total is None:
            raise ConfigError(f"{type(self).__name__}.finalize() called before any update.")
        return self.total.cpu()


class Mean(Sum):
    """Mean over ``dims`` (exact under merging: sums and counts are kept, not means)."""

    def finalize(self) -> torch.Tensor:
        return super().finalize() / max(self.count, 1)


class Moments(Reducer):
    """Mean and (population) variance over ``dims`` with Chan's parallel merge."""

    def __init__(self, dims=(0,), transform=None):
        super().__init__(dims, transform)
        self._reset()

    def _reset(self):
        super()._reset()
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _combine(self, n_b, mean_b, m2_b):
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        self._check_shape("mean", self.mean, mean_b)
        mean_b, m2_b = mean_b.to(self.mean.device), m2_b.to(self.mean.device)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / n)
        self.n = n

    def _update(self, x):
        d = _norm_dims(self.dims, x.ndim)
        x = x.to(torch.float64)
        n_b = math.prod(x.shape[i] for i in d) if d else 1
        mean_b = x.mean(dim=d) if d else x
        m2_b = ((x - mean_b.reshape([1 if i in d else s for i, s in enumerate(x.shape)])) ** 2).sum(dim=d) if d else torch.zeros_like(x)
        self._combine(n_b, mean_b, m2_b)

    def _merge(self, other):
        self._combine(other.n, other.mean, other.m2)

    def _state(self):
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    def finalize(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise ConfigError("Moments.finalize() called before any update.")
        return {"mean": self.mean.cpu(), "var": (self.m2 / max(self.n, 1)).cpu(), "count": self.n}


class Max(Reducer):
    """Elementwise maximum over ``dims``."""

    _op = staticmethod(torch.maximum)
    _red = "amax"

    def __init__(self, dims=(0,), transform=None):
        super().__init__(dims, transform)
        self._reset()

    def _reset(self):
        super()._reset()
        self.value: torch.Tensor | None = None

    def _update(self, x):
        d = _norm_dims(self.dims, x.ndim)
        v = getattr(x.float(), self._red)(dim=d) if d else x.float()
        self._check_shape("value", self.value, v)
        self.value = v if self.value is None else self._op(self.value, v.to(self.value.device))

    def _merge(self, other):
        self.value = self._op(self.value, other.value.to(self.value.device))

    def _state(self):
        return {"value": self.value}

    def finalize(self) -> torch.Tensor:
        if self.value is None:
            raise ConfigError(f"{type(self).__name__}.finalize() called before any update.")
        return self.value.cpu()


class Min(Max):
    """Elementwise minimum over ``dims``."""

    _op = staticmethod(torch.minimum)
    _red = "amin"


class Histogram(Reducer):
    """Counts of values in fixed bins ``[lo, hi)`` (values outside go to under/overflow).

    Fixed edges make merging exact. ``dims`` defaults to every axis (one histogram); keep an axis
    (e.g. ``dims=(0, 1)`` on ``[B, T, H]``) to get one histogram per entry of the kept axes.
    """

    def __init__(self, bins: int = 64, range: tuple[float, float] = (0.0, 1.0), dims=None, transform=None):
        if bins < 1:
            raise ConfigError(f"Histogram bins={bins}; use bins >= 1.")
        if not range[1] > range[0]:
            raise ConfigError(f"Histogram range={range}; the upper edge must exceed the lower.")
        super().__init__(dims, transform)
        self.bins, self.range = bins, (float(range[0]), float(range[1]))
        self._reset()

    def _settings(self):
        return super()._settings() + ("bins", "range")

    def _reset(self):
        super()._reset()
        self.counts: torch.Tensor | None = None

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.range[0], self.range[1], self.bins + 1, dtype=torch.float64)

    def _update(self, x):
        d = _norm_dims(self.dims, x.ndim)
        keep = [i for i in range(x.ndim) if i not in d]
        keep_shape = [x.shape[i] for i in keep]
        x = x.float().permute(*keep, *d).reshape(math.prod(keep_shape), -1)
        lo, hi = self.range
        # bin 0 is underflow, bins+1 overflow (NaN counts as overflow)
        idx = ((x - lo) / (hi - lo) * self.bins).floor().clamp_(-1, self.bins).nan_to_num_(self.bins).long() + 1
        counts = torch.zeros(x.shape[0], self.bins + 2, dtype=torch.int64, device=x.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx))
        counts = counts.reshape(*keep_shape, self.bins + 2)
        self._check_shape("counts", self.counts, counts)
        self.counts = counts if self.counts is None else self.counts + counts.to(self.counts.device)

    def _merge(self, other):
        self.counts = self.counts + other.counts.to(self.counts.device)

    def _state(self):
        return {"counts": self.counts}

    def finalize(self) -> dict[str, torch.Tensor]:
        """``counts`` [..., bins] inside the range, ``underflow``/``overflow`` [...], ``edges`` [bins+1]."""
        if self.counts is None:
            raise ConfigError("Histogram.finalize() called before any update.")
        c = self.counts.cpu()
        return {"counts": c[..., 1:-1], "underflow": c[..., 0], "overflow": c[..., -1], "edges": self.edges}


class TopK(Reducer):
    """The k largest values seen along the reduced axes, with where they were seen.

    Each update's reduced axes are flattened; an item's *location* is ``(update_index,
    *index_within_reduced_axes)`` where ``update_index`` counts items along the first reduced axis
    across updates (so for ``dims=(0, 1)`` on ``[B, T, ...]`` the location is ``(sample, pos)``
    with samples numbered across batches). ``finalize`` returns values [..., k] and locations
    [..., k, n_reduced_axes] for every entry of the kept axes.
    """

    def __init__(self, k: int = 10, dims=(0,), transform=None, largest: bool = True):
        if k < 1:
            raise ConfigError(f"TopK k={k}; use k >= 1.")
        super().__init__(dims, transform)
        self.k, self.largest = k, largest
        self._reset()

    def _settings(self):
        return super()._settings() + ("k", "largest")

    def _reset(self):
        super()._reset()
        self.values: torch.Tensor | None = None
        self.locs: torch.Tensor | None = None
        self.offset = 0

    def _update(self, x):
        d = _norm_dims(self.dims, x.ndim)
        keep = [i for i in range(x.ndim) if i not in d]
        red_shape = [x.shape[i] for i in d]
        xf = x.float().permute(*keep, *d).reshape(*[x.shape[i] for i in keep], -1)
        n = xf.shape[-1]
        flat = torch.arange(n, device=x.device)
        # unravel flat index into the reduced axes, then shift the first one by the running offset
        locs = []
        rem = flat
        for s in reversed(red_shape):
            locs.append(rem % s)
            rem = rem // s
        locs = torch.stack(list(reversed(locs)), dim=-1)
        locs[:, 0] += self.offset
        self.offset += red_shape[0]
        kk = min(self.k, n)
        v, i = xf.topk(kk, dim=-1, largest=self.largest)
        l = locs[i]  # [..., kk, n_red]
        self._fold(v, l)

    def _fold(self, v, l):
        if self.values is None:
            self.values, self.locs = v, l
            return
        v = torch.cat([self.values, v.to(self.values.device)], dim=-1)
        l = torch.cat([self.locs, l.to(self.locs.device)], dim=-2)
        kk = min(self.k, v.shape[-1])
        v2, i = v.topk(kk, dim=-1, largest=self.largest)
        self.values = v2
        self.locs = torch.gather(l, -2, i.unsqueeze(-1).expand(*i.shape, l.shape[-1]))

    def _merge(self, other):
        # the other shard's locations are numbered from its own 0: shift them past ours
        ol = other.locs.clone()
        ol[..., 0] += self.offset
        self.offset += other.offset
        self._fold(other.values, ol)

    def _state(self):
        return {"values": self.values, "locs": self.locs, "offset": self.offset}

    def finalize(self) -> dict[str, torch.Tensor]:
        if self.values is None:
            raise ConfigError("TopK.finalize() called before any update.")
        return {"values": self.values.cpu(), "locations": self.locs.cpu()}


class Collect(Reducer):
    """Keeps every batch (concatenated along axis 0 on the CPU).

    Use only for data you really need whole (``sonde capture``, small test inputs); prefer a
    statistic reducer for anything over a corpus. ``on_device=True`` keeps the batches (and the
    finalized tensor) on the device they came from: no device-to-host copy inside the hook, for a
    caller that goes on computing on the device (the logit lens).
    """

    def __init__(self, transform=None, dtype: torch.dtype | None = None, on_device: bool = False):
        super().__init__(None, transform)
        self.dtype = dtype
        self.on_device = on_device
        self._reset()

    def _settings(self):
        return super()._settings() + ("dtype", "on_device")

    def _reset(self):
        super()._reset()
        self.chunks: list[torch.Tensor] = []

    def _update(self, x):
        x = x.detach() if getattr(self, "on_device", False) else x.detach().to("cpu")
        self.chunks.append(x.to(self.dtype) if self.dtype is not None else x.clone())

    def _merge(self, other):
        self.chunks.extend(other.chunks)

    def _state(self):
        return {"chunks": list(self.chunks)}

    def finalize(self) -> torch.Tensor:
        if not self.chunks:
            raise ConfigError("Collect.finalize() called before any update.")
        return torch.cat(self.chunks, dim=0)


_KINDS = {c.__name__: c for c in (Sum, Mean, Moments, Max, Min, Histogram, TopK, Collect)}


def reducer_from_state(st: dict[str, Any], template: Reducer) -> Reducer:
    """Rebuild a reducer of ``template``'s settings from a ``state()`` dict (e.g. from a worker)."""
    if st.get("__kind__") != type(template).__name__:
        raise ConfigError(f"state of kind {st.get('__kind__')!r} does not fit a {type(template).__name__}.")
    r = template.empty_like()
    r.load_state(st)
    return r
