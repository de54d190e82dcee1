"""Sonde dashboard: a Streamlit multipage app (``sonde dashboard`` or ``streamlit run dashboard/app.py``).

The pages are :data:`dashboard.workbench.PAGES` (files in ``dashboard/views``), run through ``st.navigation``.
"""

from __future__ import annotations

import streamlit as st


def main() -> None:
    st.set_page_config(page_title="Sonde", page_icon="🔭", layout="wide")
    from dashboard import warm

    warm.preload_plotly()  # the browser loads plotly.js while the model loads
    warm.wait_imports()  # `sonde dashboard` imports torch & co. in a warming thread: the app imports after it
    from dashboard.workbench import PAGES
    pages = [st.Page(spec.path, title=spec.title, icon=spec.icon, url_path=name) for name, spec in PAGES.items()]

    def home() -> None:
        # the root URL opens Model & prompt under its own path, so /model (and every in-app link) names its page
        st.switch_page(pages[0], query_params=dict(st.query_params.to_dict()))

    st.navigation([st.Page(home, title="Sonde", url_path="home", default=True, visibility="hidden")] + pages).run()


main()
