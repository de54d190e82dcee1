"""What ties the pages into one workbench: cross-page links, the component panel and background runs.

* :func:`go` opens another page with its settings in the URL query string (so the link is also shareable);
* :func:`head_from_selection` turns a click on a layer × head heat map into ``"L5H3"``;
* :func:`component_panel` shows one head or neuron as every analysis sees it
  (:func:`analyses.component.profile`) with actions: ablate it in a counterfactual, compare routes with it ablated;
* :func:`run_job` runs a long analysis in a background thread with a progress bar, a Cancel button and,
  where the analysis streams, partial results; the page never freezes.

Pages stay thin: they call ``analyses.*`` and these helpers, nothing touches hooks.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from analyses.core.progress import Progress
from probes import SondeError, head_label

__all__ = ["PAGES", "PageSpec", "start_page", "go", "page_link", "selectable_heads", "head_from_selection", "node_from_selection", "component_panel", "profile_for", "Job",
           "Cancelled", "run_job", "job_view", "registry", "component_check"]

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PageSpec:
    """One page of the dashboard: its file in ``dashboard/views``, title, icon; its URL path is the file's stem."""

    file: str
    title: str
    icon: str

    @property
    def path(self) -> str:
        return str(ROOT / "views" / self.file)


# the dashboard's one page registry, in navigation order: dashboard/app.py builds st.navigation from it, links use it.
# (The pages live in views/, not pages/: Streamlit would run a pages/ folder in its legacy mode on a fresh server.)
PAGES: dict[str, PageSpec] = {
    "model": PageSpec("model.py", "Model & prompt", ":material/text_fields:"),
    "routes": PageSpec("routes.py", "Information flow", ":material/account_tree:"),
    "sinks": PageSpec("sinks.py", "Sinks & dormant heads", ":material/water_drop:"),
    "bigram": PageSpec("bigram.py", "Bigram subnetwork", ":material/grid_on:"),
    "fiber": PageSpec("fiber.py", "Embedding geometry", ":material/scatter_plot:"),
    "critical": PageSpec("critical.py", "Critical tokens", ":material/priority_high:"),
    "counterfactual": PageSpec("counterfactual.py", "Counterfactuals", ":material/call_split:"),
    "component": PageSpec("component.py", "Component", ":material/memory:"),
    "results": PageSpec("results.py", "Results", ":material/folder_open:"),
}


# ----------------------------------------------------------------------------- the head of every page
def start_page(title: str, caption: str | None = None, *, load: bool = True, stop: bool = True) -> Any:
    """Every page's head: its title and caption, and the shared context (model, prompt, BOS) in the sidebar.

    Returns the loaded probe; without one (an error is shown) the page stops there, unless ``stop=False`` (a page with
    parts that need no model). ``load=False``: the context is shown and carried, no model is loaded (returns None).
    """
    from dashboard.state import sidebar_probe

    st.title(title)
    if caption:
        st.caption(caption)
    probe = sidebar_probe(load=load)
    if probe is None and load and stop:
        st.stop()
    return probe


# ----------------------------------------------------------------------------- links
def _params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in params.items() if v is not None and str(v) != ""}


def go(page: str, **params: Any) -> None:
    """Switch to ``page`` (a key of :data:`PAGES`) with ``params`` as its URL query string.

    When the page runs on its own (``streamlit run dashboard/views/x.py``, AppTest of one file) there is no
    navigation to switch in: the parameters are written to this page's URL and a link is shown instead.
    """
    from streamlit.errors import StreamlitAPIException

    from dashboard.state import url_context

    spec = PAGES[page]
    q = _params({**url_context(), **params})  # every link carries the model, backend, dtype, prompt and BOS policy
    st.session_state["_sonde_link"] = {"page": page, **q}  # what the last link asked for (tests and the target page read it)
    try:
        st.switch_page(spec.path, query_params=q)
    except StreamlitAPIException:
        st.query_params.update(q)
        st.info(f"Open the **{spec.title}** page with `?" + "&".join(f"{k}={v}" for k, v in q.items()) + "` (this page runs "
                "outside the dashboard's navigation).", icon=":material/link:")


def page_link(page: str, label: str, *, icon: str | None = None, **params: Any) -> None:
    """A link to another page carrying ``params`` (falls back to a caption outside the navigation)."""
    from streamlit.errors import StreamlitAPIException

    from dashboard.state import url_context

    spec = PAGES[page]
    try:
        st.page_link(spec.path, label=label, icon=icon, query_params=_params({**url_context(), **params}))
    except (StreamlitAPIException, KeyError):
        st.caption(f"{label}: the {spec.title} page")


def _axis_int(v: Any) -> int | None:
    if isinstance(v, (int, float)) and float(v).is_integer():
        return int(v)
    m = re.fullmatch(r"[LH]?(\d+)", str(v).strip())
    return int(m.group(1)) if m else None


def selectable_heads(fig: Any) -> Any:
    """Make each cell of a layer (y) × head (x) heat map clickable.

    Plotly heat maps do not take part in selections, so a transparent marker is laid over every cell; a click
    selects it and :func:`head_from_selection` reads the head. The markers repeat the cell's hover text.
    """
    import plotly.graph_objects as go

    hm = next((t for t in fig.data if t.type == "heatmap"), None)
    if hm is None:
        return fig
    import numpy as np

    z = np.asarray(hm.z, dtype=float)
    L, H = z.shape
    xs = list(hm.x) if hm.x is not None else list(range(H))
    ys = list(hm.y) if hm.y is not None else list(range(L))
    px_, py_, text = [], [], []
    for l in range(L):
        for h in range(H):
            px_.append(xs[h])
            py_.append(ys[l])
            text.append(f"{head_label(l, h)}: {z[l, h]:.3f}")
    fig.add_trace(go.Scatter(x=px_, y=py_, mode="markers", customdata=[t.split(":")[0] for t in text], text=text,
                             hovertemplate="%{text}<extra>click to open</extra>", showlegend=False,
                             marker=dict(symbol="square", size=max(6, min(24, int(300 / max(L, H)))), opacity=0.01,
                                         color="#000")))
    # keep the heat map's extent (markers would otherwise pad the autorange and shift the cells)
    rev = getattr(fig.layout.yaxis, "autorange", None) == "reversed"
    fig.update_layout(clickmode="event+select", dragmode=False,
                      xaxis=dict(range=[-0.5, H - 0.5], autorange=False),
                      yaxis=dict(range=[L - 0.5, -0.5] if rev else [-0.5, L - 0.5], autorange=False))
    return fig


def _selected_points(event: Any) -> list[dict]:
    """The clicked points of a plotly selection event (dict or attribute form)."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(event, "selection", None), "points", None)
    return list(points or [])


def _label(p: dict, pattern: str) -> str | None:
    """The point's customdata label when it matches ``pattern``."""
    cd = p.get("customdata")
    if isinstance(cd, (list, tuple)):
        cd = cd[0] if cd else None
    return cd if isinstance(cd, str) and re.fullmatch(pattern, cd) else None


def head_from_selection(event: Any) -> str | None:
    """The head label of the first clicked cell of a layer (y) × head (x) heat map, or None."""
    for p in _selected_points(event):
        label = _label(p, r"L\d+H\d+")
        if label:
            return label
        x, y = _axis_int(p.get("x")), _axis_int(p.get("y"))
        if x is not None and y is not None:
            return head_label(y, x)
    return None


def node_from_selection(event: Any) -> str | None:
    """The route-graph node (``X0_3``, ``A5_3`` …) of the first clicked marker, or None."""
    return next((lab for p in _selected_points(event) if (lab := _label(p, r"[XAMI]\d+_\d+"))), None)


def component_check(probe) -> Callable[[str], str | None]:
    """A ``state.param`` check for a head/neuron label of this model (``L5H3``, ``L2N17``)."""

    def check(v: str) -> str | None:
        from analyses.component import parse_component

        try:
            parse_component(v, probe.info)
        except SondeError as e:
            return str(e).rstrip(".")
        return None

    return check


# ----------------------------------------------------------------------------- component panel
def _store_readable() -> bool:
    """Whether the results store lists without error (a malformed manifest there must not break a panel)."""
    from analyses.core import store

    try:
        store.list_results()
    except Exception as e:  # noqa: BLE001 - any unreadable manifest: panels compute from the model alone
        st.warning(f"The results store has a malformed result ({type(e).__name__}); panels ignore saved results.",
                   icon=":material/report:")
        return False
    return True


def _sink_maps(probe, cfg):
    """``component.sink_maps``: a saved dormant result of this model, else a small run, saved to the results store
    (so later sessions, a restarted server and the CLI's panels read it instead of recomputing it)."""
    from analyses import component

    maps, src = component.sink_maps(probe, cfg)
    if src == "computed" and cfg.use_saved:
        try:
            src = str(maps.save())
        except Exception:  # noqa: BLE001 - a read-only results folder: the map stays in memory
            pass
    return maps, src


def profile_for(probe, label: str, *, routes_result=None, position: int | None = None):
    """A cached :class:`analyses.component.ComponentProfile` (the sink map is computed once per model and saved)."""
    from analyses import component
    from dashboard.state import _memo, _root

    cfg = component.Config(use_saved=_store_readable())
    scope = f"{_root()}|{probe.info.fingerprint}|{probe.backend}|{cfg!r}"
    if component.parse_component(label, probe.info)[0] == "head":
        with st.spinner("Sink map per domain (once per model)…"):
            maps, src = _memo(scope, "sink-maps", _compute=lambda: _sink_maps(probe, cfg))
    else:
        maps, src = None, None
    rkey = (routes_result.key, position) if routes_result is not None else None

    def compute():
        prof = component.profile(probe, label, config=cfg, sinks=maps, routes_result=routes_result, position=position)
        if src is not None and prof.sources.get("sinks") == "given":
            prof.sources["sinks"] = src
        return prof

    return _memo(scope, repr(("profile", label, rkey, src)), _compute=compute)


def component_panel(probe, label: str, *, prompt: str, routes_result=None, position: int | None = None,
                    key: str = "cp", actions: bool = True, page_link_to_self: bool = True) -> Any:
    """Render one head/neuron's profile and its actions (``page_link_to_self=False`` on the Component page itself: no
    link to the page it is on). Returns the profile (None after an error)."""
    from dashboard import components

    try:
        prof = profile_for(probe, label, routes_result=routes_result, position=position)
    except SondeError as e:
        st.error(str(e), icon="⚠️")
        return None
    with st.container(border=True, key=f"{key}-panel"):
        st.markdown(f"#### Component {prof.component}")
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("Status", prof.status, help="dormant: sink mass > θ on a domain (Guo et al. 2024)")
        sink_max = f"{prof.sink['sink_mass'].max():.2f}" if len(prof.sink) else "—"
        m2.metric("Max sink mass", sink_max)
        rf = prof.route_frequency
        m3.metric("Route frequency" if prof.sources.get("route") != "prompt" else "On this route",
                  "none" if rf is None else (f"{rf:.2f}" if prof.sources.get("route") != "prompt" else ("yes" if rf > 0 else "no")),
                  help="Share of a routes dataset's prompts whose route uses it: run the dataset view on Information flow."
                  if rf is None else None)
        m4.metric("Bigram mask", "—" if prof.bigram_kept is None else ("member" if prof.bigram_member else "not in mask"))
        if prof.bigram_kept is None:
            st.caption(f"Bigram mask: {prof.sources.get('bigram')}.")
        if len(prof.sink):
            st.markdown("**Sink mass per domain** · " + " · ".join(f"{r.domain} {r.sink_mass:.3f}{' (dormant)' if r.dormant else ''}"
                                                                    for r in prof.sink.itertuples()))
            st.plotly_chart(prof.plot(), key=f"{key}-sink-chart", config={"displaylogo": False})
        st.markdown("**Output direction through the unembedding** · promotes "
                    + ", ".join(components.token_chip(t) for t, _ in prof.top_tokens[:6]) + " · suppresses "
                    + ", ".join(components.token_chip(t) for t, _ in prof.bottom_tokens[:6]))
        st.caption("Sources: " + "; ".join(f"{k}: {v}" for k, v in prof.sources.items()))
        if actions:
            c1, c2, c3 = st.columns(3)
            if c1.button("Ablate in a counterfactual", key=f"{key}-ablate", icon=":material/call_split:",
                         help=f"Generate from the prompt with {prof.component} zeroed, same noise as the factual run."):
                go("counterfactual", prompt=prompt, kind="ablate", ablate=prof.component)
            if prof.kind == "head" and c2.button("Compare routes with it ablated", key=f"{key}-routes", icon=":material/account_tree:"):
                go("routes", prompt=prompt, component=prof.component, ablated=prof.component,
                   position=position if position is not None else None)
            if page_link_to_self:
                with c3:
                    page_link("component", "Open the Component page", icon=":material/open_in_new:", component=prof.component,
                              prompt=prompt)
        components.export_bar(prof.component, figure=prof.plot(), table=prof.to_frame(), result=prof, key=f"{key}-export",
                              code=_profile_code(probe, prof.component))
    return prof


def _profile_code(probe, label: str) -> str:
    return (f"from probes import load_model\nfrom analyses import component\n\n"
            f"probe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
            f"prof = component.profile(probe, {label!r})   # sink mass per domain, status, routes, bigram, logit lens\n"
            f"prof.summary()")


# ----------------------------------------------------------------------------- background runs
class Cancelled(SondeError):
    """Raised inside a background run when the user pressed Cancel."""


@dataclass
class Job:
    """A background run: progress in [0, 1], a cancel flag checked between steps, the result or the error.

    ``started`` is None while the run waits for a free worker (queued). ``last`` is the analysis's latest
    :class:`~analyses.core.progress.Progress` event (its phase, count, total and figures)."""

    label: str
    last: Progress | None = None
    result: Any = None
    partial: Any = None
    error: str | None = None
    finished: bool = False
    started: float | None = None
    queued_at: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self) -> float:
        return (self.last.fraction or 0.0) if self.last is not None else 0.0

    @property
    def failed(self) -> bool:
        """Finished without a result (cancelled or an error)."""
        return self.finished and self.result is None

    def step(self, event: Progress) -> None:
        """The analysis's ``progress=`` callback: keeps its latest event and checks the cancel flag (raising
        :class:`Cancelled` stops the run between two units of work)."""
        self.last = event
        if self.cancel.is_set():
            raise Cancelled(f"{self.label} was cancelled at {event}.", hint="Start it again to rerun.")


WORKERS = 2  # background runs at once on the server; later ones queue
KEEP_FINISHED = 32  # finished runs the registry remembers (their results are in the store and in memory)


@st.cache_resource(show_spinner=False)
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sonde-job")


@dataclass
class _Registry:
    """The server's background runs by job id (a result's content key where there is one): shared by every session,
    so a reload or a second tab attaches to a running job, and a job outlives the tab that started it."""

    jobs: dict[str, Job] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def queued_before(self, job: Job) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.started is None and not j.finished and j.queued_at < job.queued_at)

    def running(self) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.started is not None and not j.finished)


@st.cache_resource(show_spinner=False)
def registry() -> _Registry:
    """The server-wide job registry (one per server process)."""
    return _Registry()


def _jobs() -> dict[str, Job]:
    """This session's jobs by page slot (each the registry's own Job object)."""
    return st.session_state.setdefault("_sonde_jobs", {})


def run_job(key: str, label: str, fn: Callable[[Job], Any], *, restart: bool = False,
            job_id: str | None = None, on_done: Callable[[Any], None] | None = None) -> Job:
    """Run ``fn(job)`` in the background as the page slot ``key`` of this session; return the job.

    ``job_id`` names the run in the server's registry (default: the slot, scoped to this session); give the result's
    content key so that a reload or another tab attaches to the run instead of starting it again. A running or
    finished job with that id is reused (``restart`` starts a new one, cancelling a running one); a failed or
    cancelled one is replaced. A job this session started for the slot before, with another id, is cancelled (its
    settings changed). ``on_done(result)`` runs in the worker when it finishes (e.g. saving to the results store), so a
    closed tab's job still lands where the next page finds it.
    """
    jid = job_id if job_id is not None else f"session:{id(st.session_state)}:{key}"
    reg = registry()
    slots = _jobs()
    with reg.lock:
        job = reg.jobs.get(jid)
        if job is not None and not restart and not job.failed:
            slots[key] = job
            return job
        if job is not None and not job.finished:
            job.cancel.set()
        old = slots.get(key)
        if old is not None and old is not job and not old.finished:
            old.cancel.set()
        job = Job(label=label)
        reg.jobs[jid] = job
        done = [k for k, j in reg.jobs.items() if j.finished]
        for k in done[: max(0, len(done) - KEEP_FINISHED)]:
            del reg.jobs[k]
    slots[key] = job

    def work():
        job.started = time.time()
        try:
            if job.cancel.is_set():
                raise Cancelled(f"{label} was cancelled before it started.", hint="Start it again to rerun.")
            job.result = fn(job)
            if on_done is not None:
                on_done(job.result)
        except Cancelled as e:
            job.error = str(e)
        except SondeError as e:
            job.error = str(e)
        except Exception as e:  # noqa: BLE001 - shown on the page, not lost in a thread
            job.error = f"{type(e).__name__}: {e}"
        finally:
            job.finished = True

    _executor().submit(work)
    return job


def _progress_text(j: Job) -> str:
    if j.started is None:
        ahead = registry().queued_before(j)
        return (f"{j.label}: queued, waiting for a free worker ({WORKERS} runs at once"
                + (f"; {ahead} queued ahead" if ahead else "") + f") · {time.time() - j.queued_at:.0f} s")
    txt = f"{j.label} · {j.last}" if j.last is not None else f"{j.label}: starting"
    return f"{txt} · {time.time() - j.started:.0f} s"


def job_view(key: str, *, partial: Callable[[Any], None] | None = None, poll_s: float = 0.5) -> Job | None:
    """Progress bar + Cancel for this session's job in slot ``key`` (re-drawn every ``poll_s`` s; "queued" while it
    waits for a worker); reruns the page once it finishes."""
    job = _jobs().get(key)
    if job is None:
        return None
    if job.finished:
        if job.error:
            st.warning(job.error, icon=":material/cancel:" if "cancelled" in job.error else "⚠️")
        return job

    @st.fragment(run_every=poll_s)
    def _poll():
        j = _jobs().get(key)
        if j is None:
            return
        if j.finished:
            st.rerun(scope="app")
        st.progress(j.progress, text=_progress_text(j))
        if j.cancel.is_set():
            st.info("Cancelling: the run stops before its next step.", icon=":material/hourglass_top:")
        elif st.button("Cancel", key=f"{key}-cancel", icon=":material/stop_circle:",
                       help="Stops the run within one step (for every tab watching it). Closing the tab does not: the run "
                            "finishes and its result is saved to the results store."):
            j.cancel.set()
            st.info("Cancelling: the run stops before its next step.", icon=":material/hourglass_top:")
        if partial is not None and j.partial is not None:
            partial(j.partial)

    _poll()
    return job


def background_result(key: str, label: str, content_key: str, fn: Callable[[Job], Any], *,
                      waiting: str = "Running in the background; results appear when it finishes.") -> Any:
    """The result with ``content_key`` (the analysis's own ``result_key``): from memory or the results store when
    it is there (computed by the CLI, a notebook or another session), else computed by ``fn(job)`` in the background:
    starts the run when the key is new (or attaches to the server's run with this key: a reload, another tab), shows
    its progress bar and Cancel, and stops the page until it finishes (a cancelled or failed run offers "Run again").
    The finished result is saved to the results store by the run itself, so it lands there when the tab is closed.
    """
    from dashboard import state

    if st.session_state.get(f"_bg_sig_{key}") == content_key:  # this tab's run: it saved what the store now holds
        st.session_state.setdefault("_sonde_computed", set()).add(content_key)
    got = state.find(content_key)
    if got is not None:
        return got
    if st.session_state.get(f"_bg_sig_{key}") != content_key:  # new settings, or a new tab: start or attach
        st.session_state[f"_bg_sig_{key}"] = content_key
        run_job(key, label, fn, job_id=content_key, on_done=state._save)
    job = job_view(key)
    if job is not None and job.failed:
        if st.button("Run again", key=f"{key}-again", icon=":material/replay:"):
            st.session_state[f"_bg_sig_{key}"] = None
            st.rerun()
        st.stop()
    if job is None or not job.finished:
        st.caption(waiting)
        st.stop()
    st.session_state.setdefault("_sonde_computed", set()).add(content_key)
    got = state.find(content_key)  # saved by the run itself
    return got if got is not None else state.keep(content_key, job.result)  # a read-only store: kept in memory
