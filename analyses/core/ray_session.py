"""The local Ray instance Sonde starts for ``--engine ray``: a private temp folder, and no leftovers.

Ray keeps its session files, sockets and logs under ``_temp_dir`` (default ``/tmp/ray``, shared by every user of
the machine) and makes that folder writable by all. Sonde gives it ``<folder>/r`` inside a folder of this user's own
(mode 0700) in Sonde's cache, or under the temp folder when the cache path is too long for Ray's socket names, so
no other user can reach it. After starting Ray, Sonde records the driver and the Ray processes it started (pid and
start time) in the private folder; a driver that is killed leaves its record behind, and
the next start stops those processes (only those: each is matched by pid *and* start time, so a reused pid is
never touched) before it starts Ray again.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

from probes.errors import InputError

__all__ = ["folder", "ray_temp_dir", "record", "forget", "stop_stale"]

#: Ray's socket paths (``<folder>/r/session_<date>_<pid>/sockets/plasma_store``) must fit in 107 bytes
_MAX_FOLDER = 42
_RECORD = "sonde-driver-{pid}.json"


def folder() -> Path:
    """The private folder of Sonde's Ray sessions: ``<Sonde cache>/ray`` (mode 0700), or ``<tmp>/sonde-ray-<uid>``
    when that path is too long for Ray's socket names. It holds Ray's temp folder and the drivers' records."""
    from probes.loading import cache_dir

    p = Path(os.path.abspath(cache_dir() / "ray"))
    if len(str(p)) > _MAX_FOLDER:
        p = Path(tempfile.gettempdir()) / f"sonde-ray-{os.getuid()}"
    from probes.loading import private_folder

    return private_folder(p, what="Ray's temp folder", error=InputError)


def ray_temp_dir(private: Path) -> Path:
    """Ray's ``_temp_dir`` inside the private folder (Ray makes it writable by all; its parent keeps others out)."""
    return private / "r"


def _started(pid: int) -> float | None:
    """The start time of process ``pid`` (None when there is none, or only its exit status is left)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _ray_processes(folder: Path) -> list[int]:
    """This driver's child processes that Ray started with ``folder`` as its temp folder (GCS, raylet, monitors),
    and their descendants (agents and workers, which rename themselves ``ray::...``)."""
    import psutil

    out: list[int] = []
    for child in psutil.Process().children():
        try:
            if str(folder) in " ".join(child.cmdline()):
                out += [child.pid] + [c.pid for c in child.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def record(folder: Path, pids: list[int] | None = None) -> Path:
    """Note this driver and the Ray processes it started with ``folder`` (default: found by their command lines)
    in ``folder``."""
    import psutil

    me = psutil.Process()
    procs = [(p, t) for p in (_ray_processes(folder) if pids is None else pids) if (t := _started(p)) is not None]
    f = folder / _RECORD.format(pid=me.pid)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"driver": [me.pid, me.create_time()], "processes": procs}))
    os.replace(tmp, f)
    return f


def forget(folder: Path) -> None:
    """Drop this driver's record (Ray was shut down cleanly)."""
    (folder / _RECORD.format(pid=os.getpid())).unlink(missing_ok=True)


def _same(pid: int, start: float) -> bool:
    t = _started(pid)
    return t is not None and abs(t - start) < 1e-3


def stop_stale(folder: Path, *, wait: float = 5.0) -> list[int]:
    """Stop the Ray processes recorded by drivers that are gone (killed before they shut Ray down); returns their
    pids. A record whose driver still runs is left alone (another Sonde sweep)."""
    stopped: list[int] = []
    for f in sorted(folder.glob(_RECORD.format(pid="*"))):
        try:
            rec = json.loads(f.read_text())
            (dpid, dstart), procs = rec["driver"], [(int(p), float(t)) for p, t in rec["processes"]]
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)  # not a record Sonde wrote whole
            continue
        if _same(int(dpid), float(dstart)):
            continue
        alive = [p for p, t in procs if _same(p, t)]
        for p in alive:
            try:
                os.kill(p, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_same(p, t) for p, t in procs):
            time.sleep(0.1)
        for p, t in procs:
            if _same(p, t):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        stopped += alive
        f.unlink(missing_ok=True)
    return stopped
