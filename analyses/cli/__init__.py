"""The ``sonde`` command line.

Verbs: ``info``, ``capture``, ``run <analysis>``, ``results ls|show``, ``dashboard``. Each analysis
registers its ``run`` verbs in its own module ``analyses/cli/<name>.py`` through a
``register(run_app)`` function; this package discovers them.

Errors the user can fix (:class:`probes.SondeError`) print one line and exit with status 2;
``--debug`` shows the traceback instead. Options are checked while the command line is parsed (paths,
ranges, devices: :mod:`.common`'s callbacks), before a model loads. A damaged file that a reader meets
where Sonde did not expect it (a safetensors, Parquet or GGUF reader's own error) is one line with status 2
too; any other exception is a bug: status 1, its type and message (``--debug`` for the traceback). Every verb with ``--out`` also takes ``--replace``
(:func:`common.output_options`): ``--out`` must be new, an empty folder, or a Sonde result, which is
replaced only with ``--replace``; this is checked before the model loads.
"""

from __future__ import annotations

import importlib
import pkgutil

from .common import app, run_app, main, output_options

__all__ = ["app", "main"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod in ("common", "core"):
        continue
    _m = importlib.import_module(f"{__name__}.{_mod}")
    if hasattr(_m, "register"):
        _m.register(run_app)

importlib.import_module(f"{__name__}.core")  # info, capture, results, dashboard

output_options(app)  # --replace and the --out check for every verb that writes a result
