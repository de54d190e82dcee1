"""Sonde dashboard: a Streamlit multipage app (``sonde dashboard`` or ``streamlit run dashboard/app.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT.parent) not in sys.path:  # `streamlit run dashboard/app.py` from a checkout
    sys.path.insert(0, str(ROOT.parent))

# (file in dashboard/pages, title, icon); pages whose file is absent are left out
PAGES = [
    ("model.py", "Model & prompt", ":material/text_fields:"),
    ("routes.py", "Information flow", ":material/account_tree:"),
    ("sinks.py", "Sinks & dormant heads", ":material/water_drop:"),
    ("bigram.py", "Bigram subnetwork", ":material/grid_on:"),
    ("fiber.py", "Embedding geometry", ":material/scatter_plot:"),
    ("critical.py", "Critical tokens", ":material/priority_high:"),
    ("counterfactual.py", "Counterfactuals", ":material/call_split:"),
    ("component.py", "Component", ":material/memory:"),
    ("results.py", "Results", ":material/folder_open:"),
]


def main() -> None:
    st.set_page_config(page_title="Sonde", page_icon="🔭", layout="wide")
    from dashboard import warm

    warm.wait_imports()  # `sonde dashboard` imports torch & co. in a warming thread: pages import after it
    pages = [st.Page(str(ROOT / "pages" / f), title=t, icon=i, url_path=f[:-3])
             for f, t, i in PAGES if (ROOT / "pages" / f).is_file()]

    def home() -> None:
        # the root URL opens Model & prompt under its own path, so /model (and every in-app link) names its page
        st.switch_page(pages[0], query_params=dict(st.query_params.to_dict()))

    st.navigation([st.Page(home, title="Sonde", url_path="home", default=True, visibility="hidden")] + pages).run()


main()
