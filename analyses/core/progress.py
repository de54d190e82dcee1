"""One progress protocol for every analysis: the ``progress=`` callback of every ``run`` receives :class:`Progress`.

An event says which phase a run is in, how far it got and how far it has to go::

    Progress(phase="rollouts", done=3, total=9, unit="prefixes", info={"problem": 1})

A phase reports ``done=0`` when it starts (so a long first unit is never silent), then after every unit, and its
last event has ``done == total`` when the total is known. ``total`` is ``None`` when a phase cannot know its length;
where it can only estimate it (a bisection), the estimate is a bound the run stays under. Phases follow each other
(``sampling``, then ``rollouts``, ...); a consumer shows one bar per phase. ``info`` carries figures worth showing
beside the bar (a loss, a density); they are display values, never needed to follow the run.

Analyses report through :func:`phase`::

    bar = phase(progress, "kNN", total=n_blocks, unit="blocks")   # reports 0/n_blocks at once
    for block in blocks:
        ...
        bar.advance()                                           # 1/n_blocks, 2/n_blocks, ...

Consumers: the CLI's bars (``analyses.cli.common.progress_bar``), the dashboard's background jobs
(``dashboard.workbench.Job.step``) and, in a notebook, any callable (``progress=print`` prints each event).
A callback may raise to stop the run (the dashboard's Cancel does): analyses call it between units of work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Progress", "ProgressFn", "Phase", "phase", "check"]


@dataclass(frozen=True)
class Progress:
    """How far a run got: ``done`` of ``total`` ``unit`` in ``phase`` (``total`` None when unknown)."""

    phase: str
    done: int
    total: int | None = None
    unit: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or None when the total is unknown."""
        return None if not self.total else min(1.0, self.done / self.total)

    @property
    def finished(self) -> bool:
        """True on a phase's last event (its total is known and reached)."""
        return self.total is not None and self.done >= self.total

    @property
    def figures(self) -> str:
        """``info`` as shown beside a bar: `` (loss 0.5, kept 3%)``, or ``""``."""
        extra = ", ".join(f"{k} {v}" for k, v in self.info.items())
        return f" ({extra})" if extra else ""

    @property
    def count(self) -> str:
        """``3/9 prefixes`` (``3 prefixes`` when the total is unknown)."""
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.done}{of}" + (f" {self.unit}" if self.unit else "")

    def __str__(self) -> str:
        return f"{self.phase}: {self.count}{self.figures}"


ProgressFn = Callable[[Progress], None]


class Phase:
    """One phase of a run, reporting to a ``progress`` callback (a no-op when it is None)."""

    __slots__ = ("_fn", "name", "done", "total", "unit", "info")

    def __init__(self, progress: ProgressFn | None, name: str, total: int | None = None, unit: str = "", *,
                 done: int = 0, **info: Any) -> None:
        self._fn, self.name, self.total, self.unit = progress, name, total, unit
        self.done, self.info = int(done), dict(info)
        self._emit()

    def _emit(self) -> None:
        if self._fn is not None:
            self._fn(Progress(self.name, self.done, self.total, self.unit, dict(self.info)))

    def advance(self, n: int = 1, **info: Any) -> None:
        """``n`` more units done (``info`` updates the figures shown beside the bar)."""
        self.done += int(n)
        self.info.update(info)
        self._emit()

    def set(self, done: int, total: int | None = None, **info: Any) -> None:
        """``done`` units done so far (and a new ``total``, e.g. when an estimate becomes exact)."""
        self.done = int(done)
        if total is not None:
            self.total = int(total)
        self.info.update(info)
        self._emit()

    def close(self) -> None:
        """End the phase: its last event has ``done == total`` (the total becomes ``done`` when fewer units were
        needed than planned, as when a sequential test stops early)."""
        if self.total != self.done:
            self.total = self.done
            self._emit()


def phase(progress: ProgressFn | None, name: str, total: int | None = None, unit: str = "", *, done: int = 0,
          **info: Any) -> Phase:
    """Start reporting phase ``name`` to ``progress`` (None: report nothing): emits ``done`` (0, or the units a
    resumed run already has) at once."""
    return Phase(check(progress), name, total, unit, done=done, **info)


def check(progress: Any) -> ProgressFn | None:
    """``progress`` when it is None or callable; a one-line error otherwise (raised before any work starts)."""
    if progress is not None and not callable(progress):
        from probes.errors import ConfigError

        raise ConfigError(f"progress must be a callable that takes one Progress event, not {type(progress).__name__}.",
                          hint="Pass e.g. progress=print, or leave it out.")
    return progress
