"""``python -m dashboard.serve [streamlit options]``: what ``sonde dashboard`` runs.

Starts warming the default model (:mod:`dashboard.warm`) in a background thread, then hands over to
Streamlit's own command line (``streamlit run dashboard/app.py [options]``) in this process, so the
imports and the model load overlap the server's start and the browser's first connection.
``SONDE_NO_WARM=1`` skips the warming (the page then loads the model when it first asks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def main(argv: list[str] | None = None) -> None:
    from dashboard import warm

    if os.environ.get("SONDE_NO_WARM", "") in ("", "0"):
        warm.start((os.environ.get("SONDE_MODEL", "embedded"), *warm.DEFAULT_KEY[1:]))
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *(sys.argv[1:] if argv is None else argv)]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
