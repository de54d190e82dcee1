"""Dashboard input safety: every page's query parameters and uploads are user input.

A table of bad links and uploads, each run headless (``streamlit.testing.v1.AppTest``) on a tiny random model
saved to a local folder: the page raises nothing, shows exactly one ``st.error`` line and keeps its defaults.
Results browsing stays inside the results root (``?dir=/``, ``..``, symbolic links, manifests naming tables
outside the result, manifests that are not objects).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

import tiny_models  # noqa: E402
from conftest import wait_background  # noqa: E402

TIMEOUT = 180


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama saved as a local folder (the dashboard's model) and a results root with good and bad results."""
    base = tmp_path_factory.mktemp("dash-inputs")
    model_dir = base / "tiny-llama"
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_models.config("llama")
    cfg.max_position_embeddings = 4096  # room for the long-prompt cases (~3,000 byte tokens)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    m.save_pretrained(model_dir)
    tiny_models.tokenizer().save_pretrained(model_dir)
    res = base / "results"
    from analyses import logit_lens
    from probes import load_model

    probe = load_model(str(model_dir), backend="nnsight", device="cpu")
    logit_lens.run(probe, "Hello world", config=logit_lens.Config(k=2)).save(res / "good")
    (res / "listtop").mkdir(parents=True)
    (res / "listtop" / "manifest.json").write_text("[1, 2, 3]")
    (res / "escape").mkdir()
    (base / "secret.parquet").write_bytes(b"not yours")
    (res / "escape" / "manifest.json").write_text(json.dumps({"analysis": "logit-lens", "tables": ["../../secret"]}))
    (res / "broken").mkdir()
    (res / "broken" / "manifest.json").write_text("{not json")
    os.symlink("/", res / "rootlink")  # a symbolic link out of the results root: never walked
    old = {k: os.environ.get(k) for k in ("SONDE_MODEL", "SONDE_RESULTS")}
    os.environ["SONDE_MODEL"] = str(model_dir)
    os.environ["SONDE_RESULTS"] = str(res)
    yield {"model": str(model_dir), "results": res, "base": base}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _page(file: str, params: dict[str, str]) -> AppTest:
    at = AppTest.from_file(str(ROOT / "dashboard" / "views" / file), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at.run()


def _w(at, kind: str, key: str):
    hits = [w for w in getattr(at, kind) if w.key == key]
    assert hits, f"no {kind} {key!r}"
    return hits[0]


def _by_label(at, kind: str, label: str):
    hits = [w for w in getattr(at, kind) if w.label == label]
    assert hits, f"no {kind} labelled {label!r}; have {[w.label for w in getattr(at, kind)]}"
    return hits[0]


def _q(at, name: str) -> str:
    v = at.query_params[name]
    return v[0] if isinstance(v, list) else v


# (page, query parameters, check that the defaults were kept)
CASES = [
    # Model & prompt
    ("model.py", {"backend": "foo"}, lambda at: _w(at, "selectbox", "ctx_backend").value == "nnsight"),
    ("model.py", {"dtype": "fp8"}, lambda at: _w(at, "selectbox", "ctx_dtype").value == "auto"),
    ("model.py", {"device": "tpu"}, lambda at: _w(at, "selectbox", "ctx_device").value == "auto"),
    ("model.py", {"bos": "maybe"}, lambda at: _w(at, "toggle", "ctx_bos").value is False),
    ("model.py", {"k": "abc"}, lambda at: _w(at, "number_input", "model_k").value == 5),
    ("model.py", {"k": "99"}, lambda at: _w(at, "number_input", "model_k").value == 5),
    ("model.py", {"color": "purple"}, lambda at: _w(at, "radio", "model_color").value == "final"),
    ("model.py", {"prompt": "   "}, lambda at: _w(at, "text_area", "ctx_prompt").value.startswith("The Eiffel Tower")),
    # Information flow
    ("routes.py", {"tau": "abc"}, lambda at: _w(at, "slider", "routes_tau").value == pytest.approx(0.04)),
    ("routes.py", {"tau": "nan"}, lambda at: _w(at, "slider", "routes_tau").value == pytest.approx(0.04)),
    ("routes.py", {"position": "999"}, lambda at: _w(at, "selectbox", "routes_position").value == _w(at, "selectbox", "routes_position").options[-1]),
    ("routes.py", {"component": "L99H0"}, lambda at: _w(at, "selectbox", "routes_component").value is not None),
    ("routes.py", {"ablated": "L0H99"}, lambda at: "ablated" not in at.query_params),
    ("routes.py", {"node": "Z9_9"}, lambda at: _w(at, "selectbox", "routes_node").value.startswith("I")),
    ("routes.py", {"renorm": "maybe"}, lambda at: _w(at, "checkbox", "routes_renorm").value is True),
    ("routes.py", {"cmp": "bogus"}, lambda at: _w(at, "radio", "routes_compare").value == "off" and "cmp" not in at.query_params),
    ("routes.py", {"cmp": "prompt", "prompt_b": "   "}, lambda at: _w(at, "text_input", "routes_prompt_b").value == ""
     and any("Type the second prompt" in i.value for i in at.info)),
    ("routes.py", {"cmp": "dtype", "dtype_b": "fp8"}, lambda at: _w(at, "selectbox", "routes_dtype_b").value == "bfloat16"),
    ("routes.py", {"cmp": "adapter", "adapter_b": "/etc"}, lambda at: _w(at, "text_input", "routes_adapter_b").value == ""
     and "not a LoRA adapter folder" in at.error[0].value and any("Type the adapter folder" in i.value for i in at.info)),
    # Counterfactuals
    ("counterfactual.py", {"temperature": "abc"}, lambda at: _by_label(at, "slider", "Temperature (0 = greedy)").value == pytest.approx(0.8)),
    ("counterfactual.py", {"temperature": "inf"}, lambda at: _by_label(at, "slider", "Temperature (0 = greedy)").value == pytest.approx(0.8)),
    ("counterfactual.py", {"top_p": "5"}, lambda at: _by_label(at, "slider", "Top-p (1 = off)").value == pytest.approx(1.0)),
    ("counterfactual.py", {"max_new_tokens": "100000"}, lambda at: _by_label(at, "slider", "New tokens").value == 20),
    ("counterfactual.py", {"kind": "foo"}, lambda at: _by_label(at, "radio", "Intervention").value == "token edit"),
    ("counterfactual.py", {"kind": "ablate", "ablate": "L99H0"}, lambda at: _by_label(at, "text_input", "Heads / neurons to zero").value == "L0H0"),
    # Sinks & dormant heads
    ("sinks.py", {"domain": "nope"}, lambda at: _by_label(at, "selectbox", "Domain").value == "prose"),
    ("sinks.py", {"eps": "abc"}, lambda at: _by_label(at, "slider", "ε").value == pytest.approx(0.3)),
    ("sinks.py", {"T": "99999"}, lambda at: _by_label(at, "number_input", "T").value == 64),
    ("sinks.py", {"component": "L99H0"}, lambda at: not any("Component L99H0" in m.value for m in at.markdown)),
    # Bigram subnetwork
    ("bigram.py", {"lam": "abc"}, lambda at: _by_label(at, "number_input", "λ (sparsity)").value == pytest.approx(10.0)),
    ("bigram.py", {"steps": "0"}, lambda at: _by_label(at, "number_input", "Steps").value == 4),
    ("bigram.py", {"layers": "7,8"}, lambda at: _by_label(at, "text_input", "Blocks to mask").value == "0"),
    ("bigram.py", {"target": "x"}, lambda at: _by_label(at, "selectbox", "Target").value == "bigram"),
    ("bigram.py", {"mask": "/etc"}, lambda at: _by_label(at, "text_input", "Load a saved result folder (optional)").value == ""),
    ("bigram.py", {"corpus": "/etc/passwd"}, lambda at: _by_label(at, "text_input", "Corpus").value == "builtin"),
    # Embedding geometry
    ("fiber.py", {"matrix": "foo"}, lambda at: _by_label(at, "selectbox", "Matrix").value == "input"),
    ("fiber.py", {"tokens": "0:999999999999"}, lambda at: _by_label(at, "text_input", "Tokens").value.startswith("0:256")),
    ("fiber.py", {"vol_max": "abc"}, lambda at: _by_label(at, "number_input", "vol_max").value == 256),
    # Critical tokens
    ("critical.py", {"rollouts": "abc"}, lambda at: _by_label(at, "number_input", "Rollouts per prefix").value == 3),
    ("critical.py", {"granularity": "foo"}, lambda at: _by_label(at, "selectbox", "Granularity").value == "token"),
    # Component
    ("component.py", {"component": "L99H0"}, lambda at: _w(at, "text_input", "component_label").value == "L0H0"),
    # Results: browsing confined to the results root
    ("results.py", {"dir": "/"}, lambda at: Path(_w(at, "text_input", "results_dir").value) == Path(os.environ["SONDE_RESULTS"]).resolve()),
    ("results.py", {"dir": "../.."}, lambda at: Path(_w(at, "text_input", "results_dir").value) == Path(os.environ["SONDE_RESULTS"]).resolve()),
    ("results.py", {"result": "/etc"}, lambda at: _q(at, "result") != "/etc" and Path(_q(at, "result")).resolve().is_relative_to(Path(os.environ["SONDE_RESULTS"]).resolve())),
]


@pytest.mark.parametrize("page,params,kept", CASES, ids=[f"{p[:-3]}-{'&'.join(f'{k}={v}' for k, v in q.items())}" for p, q, _ in CASES])
def test_bad_query_parameter(env, page, params, kept):
    at = _page(page, params)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    name = next(iter(params)) if len(params) == 1 else list(params)[-1]
    assert name in at.error[0].value
    assert kept(at)


def test_results_page_skips_malformed_and_escaping_manifests(env):
    at = _page("results.py", {})
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    listed = _w(at, "selectbox", "results_pick").options  # labels "analysis · model · created · folder"
    assert any(x.endswith("· good") for x in listed)  # (routes the other tests stored under dashboard/ may be listed too)
    assert not any(x.endswith(("· listtop", "· escape", "· broken")) for x in listed)
    warn = " ".join(w.value for w in at.warning)
    assert "Skipped 3 malformed" in warn and "listtop" in warn and "escape" in warn and "broken" in warn
    assert "rootlink" not in warn  # the symbolic link to / was not followed


def test_inside_results_refuses_symlinks_out(env):
    from dashboard.state import inside_results

    res = env["results"]
    assert inside_results(res / "good") == (res / "good").resolve()
    assert inside_results(res / "rootlink") is None
    assert inside_results(res / "rootlink" / "etc") is None
    assert inside_results(res / ".." / "secret.parquet") is None
    assert inside_results("/") is None


def test_latin1_upload_refused_with_offset(env):
    at = _page("routes.py", {})
    assert not at.exception
    text = "Caf\u00e9 au lait".encode("latin-1")
    at.file_uploader(key="routes_dataset").set_value(("prompts.txt", text, "text/plain")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    assert "not UTF-8" in at.error[0].value and "offset 3" in at.error[0].value
    assert not at.get("progress")  # nothing started


def test_bad_jsonl_upload_names_the_line(env):
    at = _page("routes.py", {})
    at.file_uploader(key="routes_dataset").set_value(("p.jsonl", b'{"text": "a"}\n{oops\n', "application/json")).run()
    assert not at.exception
    assert len(at.error) == 1 and "line 2" in at.error[0].value


# ----------------------------------------------------------------------------- one context across pages
def test_context_survives_page_switch_and_links_carry_it(env):
    """Model, prompt and BOS set on Model & prompt stay when Information flow opens (the same tokens: the same
    BOS policy), and the URL of every page carries them."""
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("views/model.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.text_area("ctx_prompt").set_value("Paris is the capital of")
    at.button[0].click().run()  # the form's Run
    at.sidebar.toggle("ctx_bos").set_value(True).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    n_model = len(at.dataframe[0].value)  # next-token table: one row per position
    at.switch_page("views/routes.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Information flow"
    assert at.text_input("ctx_prompt").value == "Paris is the capital of"
    assert at.sidebar.toggle("ctx_bos").value is True
    assert at.sidebar.text_input("ctx_model").value == env["model"]
    assert len(at.selectbox("routes_position").options) == n_model  # same tokens, BOS included on both pages
    q = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert q["prompt"] == "Paris is the capital of" and q["bos"] == "1" and q["model"] == env["model"]


def test_new_prompt_resets_the_predicted_position(env):
    at = _page("routes.py", {"prompt": "Hello there friend", "position": "2"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox("routes_position").value.startswith("2:")
    at.text_input("ctx_prompt").set_value("A much longer prompt than the first one").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    sel = at.selectbox("routes_position")
    assert sel.value == sel.options[-1] and len(sel.options) > 3  # the new prompt's last position, not the old index


def test_bos_default_is_one_policy():
    from analyses import logit_lens, routes

    assert logit_lens.Config().prepend_bos is routes.Config().prepend_bos is False


def test_ablated_routes_have_their_own_content_key(env):
    from analyses import routes
    from probes import Ablate, load_model

    probe = load_model(env["model"], backend="nnsight", device="cpu")
    cfg = routes.Config()
    a = routes.run(probe, "Hello world", config=cfg)
    b = routes.run(probe, "Hello world", config=cfg, edits=[Ablate("blocks.1.attn.hook_z", heads=[1])])
    assert a.input_hash != b.input_hash and a.key != b.key
    assert routes.run(probe, "Hello world", config=cfg).key == a.key  # unedited runs keep one key


# ----------------------------------------------------------------------------- long prompts: capped views
LONG = "The quick brown fox jumps over the lazy dog. " * 67  # ~3,000 byte tokens on the tiny model


def test_long_prompt_model_page_draws_a_window(env):
    import time

    from conftest import wait_background

    t0 = time.perf_counter()
    at = _page("model.py", {"prompt": LONG})
    assert at.get("progress"), "a long prompt's lens runs in the background with a progress bar"
    at = wait_background(at)
    elapsed = time.perf_counter() - t0
    assert not at.exception and not at.error, [e.value for e in at.error]
    fig = at.get("plotly_chart")[0]
    spec = json.loads(fig.proto.spec)
    assert len(spec["data"][0]["x"]) == 48  # 48 columns, not 3,000
    assert max(len(t) for row in spec["data"][0]["text"] for t in row) <= 4  # 48 cells a row: short labels, no overlap
    assert any("tokens: positions" in c.value for c in at.caption)
    assert len(at.dataframe[0].value) == 48  # the next-token table follows the window
    assert elapsed < 120, elapsed


def test_long_prompt_routes_trace_a_window(env):
    at = _page("routes.py", {"prompt": LONG})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.slider("routes_window").value == 256  # "Tokens to trace", the control the note points at
    assert any("Tokens to trace" in c.value for c in at.caption)
    assert len(at.selectbox("routes_position").options) == 256
    # header, box, note and axis name the same positions: the prompt's, not the window's
    import re

    note = next(c.value for c in at.caption if "Tokens to trace" in c.value)
    first, last = map(int, re.search(r"positions (\d+)–(\d+)", note).groups())
    head = next(m.value for m in at.markdown if m.value.startswith("**Route to position"))
    assert f"**Route to position {last}**" in head and at.selectbox("routes_position").value.startswith(f"{last}:")
    assert at.selectbox("routes_position").options[0].startswith(f"{first}:")
    graph = next(c for c in at.get("plotly_chart") if "routes_graph" in c.proto.id)
    xaxis = json.loads(graph.proto.spec)["layout"]["xaxis"]
    assert len(xaxis["tickvals"]) <= 40 and xaxis["ticktext"][-1].startswith(f"{last}:"), xaxis["ticktext"][-3:]


# ----------------------------------------------------------------------------- one results store for CLI, notebooks, dashboard
def _api_result(page: str, probe):
    """The result a page shows by default, computed with the Python API (the page's default settings)."""
    from analyses import counterfactual as cf
    from analyses import fiber as F
    from analyses import logit_lens, routes, sinks
    from analyses.cli.fiber import parse_tokens

    prompt = "The Eiffel Tower is located in the city of"
    if page == "model.py":
        return logit_lens.run(probe, prompt, config=logit_lens.Config(k=5, prepend_bos=False))
    if page == "routes.py":
        return routes.run(probe, prompt, config=routes.Config(keep_residuals=True, prepend_bos=False))
    if page == "sinks.py":
        return sinks.run(probe, domain="prose", config=sinks.Config(eps=0.3, n_samples=1, T=16, batch_size=1, mlp_ablation=False,
                                                                     bos="tokenizer"))
    if page == "counterfactual.py":
        return cf.run(probe, prompt, "none", config=cf.Config(temperature=0.8, seed=0, max_new_tokens=6, interventional=False))
    if page == "critical.py":  # the page's defaults: the built-in question, reference 7, the wrong response
        from analyses import critical as C
        from analyses.tasks import Problem, format_prompt, make_checker

        q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
        cfg = C.Config(n_rollouts=3, max_new_tokens=2, granularity="token", temperature=0.7, alternatives="topk", n_alternatives=2,
                       alt_rollouts=1, seed=0)
        return C.search(probe, format_prompt(probe, Problem(q, "7")), "3 + 4 = 8.", make_checker(Problem("", "7")), config=cfg,
                        question=q, reference="7")
    V = probe.info.d_vocab
    return F.run(probe, config=F.Config(matrix="input", tokens=parse_tokens(f"0:{V}:{max(1, V // 600)}"), vol_max=min(300, V),
                                        mode="calibrated", alpha=1e-3, correction="none", keep_curves="all"))


STORE_PAGES = [("model.py", {}), ("routes.py", {"component": "L0H0"}), ("sinks.py", {"T": "16", "n": "1"}),
               ("counterfactual.py", {"max_new_tokens": "6"}), ("fiber.py", {}), ("critical.py", {})]


def _store_captions(at, verb: str) -> list[str]:
    prefix = f"{verb} the results store: `"
    # "Saved to the results store: `<folder>` (2.3 MB on disk)": the folder, and the size is said
    return [c.value[len(prefix):c.value.index("` (")] for c in at.caption if c.value.startswith(prefix) and c.value.endswith(" on disk)")]


@pytest.mark.parametrize("page,params", STORE_PAGES, ids=[p for p, _ in STORE_PAGES])
def test_page_shows_a_result_saved_by_the_python_api(env, page, params, tmp_path, monkeypatch):
    """A result computed and saved with the Python API (as a notebook or the CLI does) is what the page shows: it is
    found by its content key in the results store, not computed again."""
    from analyses.core import store
    from probes import load_model

    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path))
    res = _api_result(page, load_model(env["model"], backend="nnsight", device="cpu"))
    folder = res.save()
    at = _page(page, params)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert str(folder.resolve()) in _store_captions(at, "Loaded from"), [c.value for c in at.caption]
    assert str(folder.resolve()) not in _store_captions(at, "Saved to")  # not computed again (other views may be)
    listed = store.list_results(tmp_path)
    assert listed[listed["key"] == res.key]["path"].tolist() == [str(folder)]


@pytest.mark.parametrize("page,params", STORE_PAGES, ids=[p for p, _ in STORE_PAGES])
def test_python_api_finds_the_result_a_page_saved(env, page, params, tmp_path, monkeypatch):
    """The reverse: the page computes and saves its result; the Python API's store lookup by content key finds it."""
    from analyses.core import store
    from analyses.core.base import load_result
    from probes import load_model

    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path))
    at = wait_background(_page(page, params))  # the critical-token search runs in the background
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    saved = _store_captions(at, "Saved to")
    assert saved, [c.value for c in at.caption]
    res = _api_result(page, load_model(env["model"], backend="nnsight", device="cpu"))
    found = store.find_result(res.key, tmp_path)
    assert found is not None and str(found.resolve()) in saved
    assert load_result(found).key == res.key
    if page == "routes.py":  # the head panel's sink map was saved too: later sessions and servers read it, not recompute it
        assert "dormant" in store.list_results(tmp_path)["analysis"].tolist()


def _shown(at, kind: str, key: str) -> str | None:
    """What the browser's box shows after this run: the value the server sent with ``set_value`` (a keyed widget keeps
    its identity when its options change, so without it the browser keeps showing its old value), else None."""
    w = _w(at, kind, key)
    return w.proto.raw_value if w.proto.set_value else None


def test_new_prompt_resets_every_routes_selection_in_the_browser(env):
    """Information flow: after a new prompt the predicted position, node and component boxes show the new prompt's
    defaults (last position, its block output, the most important head), and the browser is told so."""
    at = _page("routes.py", {"prompt": "Hello there friend and more words", "position": "2"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    nodes = _w(at, "selectbox", "routes_node").options
    other = next(n for n in nodes if n.startswith("A"))
    at.selectbox("routes_node").set_value(other).run()
    heads = _w(at, "selectbox", "routes_component").options
    at.selectbox("routes_component").set_value(heads[-1].split(" ·")[0]).run()
    assert at.selectbox("routes_node").value == other
    at.text_input("ctx_prompt").set_value("A b").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    pos = _w(at, "selectbox", "routes_position")
    assert pos.value == pos.options[-1] and _shown(at, "selectbox", "routes_position") == pos.options[-1]
    node = _w(at, "selectbox", "routes_node")
    last = f"I{node.value[1:].split('_')[0]}_{len(pos.options) - 1}"
    assert node.value == last and node.value.startswith("I") and _shown(at, "selectbox", "routes_node") == node.value
    comp = _w(at, "selectbox", "routes_component")
    assert comp.value == comp.options[0].split(" ·")[0] and _shown(at, "selectbox", "routes_component") == comp.options[0]


def test_background_run_outlives_the_tab_and_a_reload_attaches(env):
    """Critical tokens' rollout search runs in the server's job registry under its result key: a second session (a
    reload, another tab) attaches to the running job with its progress instead of starting again from 0; Cancel
    stops it for both."""
    from dashboard.workbench import registry

    params = {"rollouts": "64", "max_new": "64", "response": "3 + 4 = 8. So the answer is 8 apples in all."}
    first = AppTest.from_file(str(ROOT / "dashboard" / "views" / "critical.py"), default_timeout=TIMEOUT)
    first.query_params.update(params)
    first.run()
    assert first.get("progress"), "the search should still be running"
    job = first.session_state["_sonde_jobs"]["critical_search"]
    assert any(j is job for j in registry().jobs.values())
    second = AppTest.from_file(str(ROOT / "dashboard" / "views" / "critical.py"), default_timeout=TIMEOUT)
    second.query_params.update(params)
    second.run()  # the reload
    assert second.session_state["_sonde_jobs"]["critical_search"] is job  # attached, not restarted
    assert second.get("progress") and "queued" not in second.get("progress")[0].proto.text or job.started is None
    [b for b in second.button if b.key == "critical_search-cancel"][0].click().run()
    deadline = __import__("time").time() + 60
    while not job.finished and __import__("time").time() < deadline:
        __import__("time").sleep(0.2)
    assert job.finished and "cancelled" in (job.error or "")


def test_a_job_waiting_for_a_worker_says_queued(env):
    from analyses.core.progress import Progress
    from dashboard.workbench import Job, _progress_text

    text = _progress_text(Job(label="Rolling out prefixes", last=Progress("rollouts", 0, 9, "prefixes")))
    assert "queued" in text and "0/9" not in text
    j = Job(label="Rolling out prefixes")
    j.started = j.queued_at
    j.step(Progress("rollouts", 2, 9, "prefixes", {"trace": 0}))
    assert "rollouts: 2/9 prefixes (trace 0)" in _progress_text(j) and j.progress == 2 / 9


def test_embedding_geometry_prints_p_values_in_scientific_notation(env):
    at = _page("fiber.py", {})
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = next(d for d in at.dataframe if "p_manifold" in d.value.columns)
    cfg = json.loads(table.proto.columns)
    assert all(cfg[c]["type_config"]["format"] == "%.2e" for c in table.value.columns if c.startswith("p_")), cfg
    assert table.value[[c for c in table.value.columns if c.startswith("p_")]].dtypes.map(lambda t: t.kind == "f").all()
    # a missing dimension reads "—", not "None" (only single-segment fits leave dim_2 empty; any missing cell will do)
    others = table.value.drop(columns=[c for c in table.value.columns if c.startswith("p_")])
    assert not others.isna().to_numpy().any(), others[others.isna().any(axis=1)].head()


def test_p_values_read_the_same_everywhere():
    """One formatter: scientific notation with an unpadded exponent (as the page's number columns print), an exact 0
    (underflow) as "< 1e-300", infinity as "∞", a missing value as "—". On the page a column with a 0 keeps its
    numbers (sorting sorts by p) and shows the text; one with a missing value becomes text; every header says why."""
    import numpy as np
    import pandas as pd

    from analyses.core.report import P_FLOOR, format_p
    from dashboard.components import p_value_table

    assert [format_p(v) for v in (9e-37, 1.0, 0.05, 0.0, float("inf"), float("nan"), None)] == [
        "9.00e-37", "1.00e+0", "5.00e-2", P_FLOOR, "∞", "—", "—"] and P_FLOOR == "< 1e-300"
    assert format_p(1.7257e-46, 1) == "1.7e-46" and format_p(5e-324) == "4.94e-324"
    df = pd.DataFrame({"token": ["a", "b", "c"], "p_manifold": [0.0, 3e-5, 1.0], "p_gap": [0.5, np.nan, np.inf],
                       "p_bh": [0.1, 0.2, 0.3]})
    data, config = p_value_table(df, ["p_manifold", "p_gap", "p_bh"], labels={"p_manifold": "p"}, width=78)
    html = data.to_html()
    assert ">< 1e-300<" in html and "3.00e-5" in html and "1.00e+0" in html
    assert data.data["p_manifold"].dtype.kind == "f" and data.data["p_bh"].dtype.kind == "f"
    assert data.data["p_gap"].tolist() == ["5.00e-1", "—", "∞"]
    assert config["p_manifold"]["label"] == "p" and config["p_manifold"]["type_config"]["format"] == "%.2e"
    assert config["p_gap"]["type_config"]["type"] == "text" and all("underflowed" in c["help"] and c["width"] == 78 for c in config.values())
    plain, _ = p_value_table(df.drop(columns="p_gap").assign(p_manifold=[1e-9, 3e-5, 1.0]), ["p_manifold", "p_bh"])
    assert isinstance(plain, pd.DataFrame)  # nothing to spell out: a plain frame, numbers formatted by the grid


def test_component_table_shows_missing_numbers_as_dashes(env):
    """With no routes dataset saved, the component's route columns read "—", not "None"."""
    at = _page("component.py", {})
    assert not at.exception
    table = next(d.value for d in at.dataframe if "route_freq" in d.value.columns)
    assert set(table["route_freq"]) == set(table["route_importance"]) == {"—"}, table


def test_tables_show_infinity_missing_and_whitespace_tokens():
    import pandas as pd

    from dashboard.components import readable

    df = pd.DataFrame({"token": [" ", "\n", "a"], "next": ["a", "b", ""], "s": [float("inf"), 1.5, float("nan")],
                       "p": [0.1, 0.2, 0.3], "x": [None, "y", "z"]})
    out = readable(df)
    assert out["token"].tolist() == ["␣", "⏎", "a"] and out["s"].tolist() == ["∞", "1.500", "—"]
    assert out["x"].tolist()[0] == "—" and out["p"].dtype.kind == "f"  # finite float columns stay numbers


def test_critical_bad_link_setting_is_one_visible_line(env):
    """``?rollouts=0`` on Critical tokens: one error line on the page itself, not inside the collapsed "Search
    settings" box, naming the value used instead."""
    at = wait_background(_page("critical.py", {"rollouts": "0"}))
    assert not at.exception
    assert len(at.error) == 1 and "rollouts=0" in at.error[0].value and "using '3'" in at.error[0].value, [e.value for e in at.error]
    box = next(e for e in at.expander if e.label == "Search settings")
    assert not box.error, "the error is hidden in the collapsed box"


def test_component_page_has_no_link_to_itself_and_names_a_missing_route_frequency(env):
    at = _page("component.py", {"component": "L0H0"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not any("Open the Component page" in c.value for c in at.caption) and not at.get("page_link")
    rf = next(m for m in at.metric if m.label == "Route frequency")
    assert rf.value == "none" and "dataset view" in rf.help


def test_sinks_log_axis_labels_decades_only(env):
    at = _page("sinks.py", {"T": "16", "n": "1"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    logs = [json.loads(c.proto.spec)["layout"]["yaxis"] for c in at.get("plotly_chart")]
    logs = [y for y in logs if y.get("type") == "log"]
    assert logs and all(y.get("dtick") == 1 for y in logs), logs


def test_all_zero_head_map_is_a_note_and_keeps_the_selected_head(env):
    """Information flow at a τ where no head is on the route (the tiny model's last position at τ = 0.10): a note
    instead of a uniform heat map, and the component box keeps the head it had rather than falling back to L0H0."""
    at = _page("routes.py", {"prompt": "A b", "position": "2", "tau": "0.04"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not any("No head is on the route" in i.value for i in at.info)
    head = _w(at, "selectbox", "routes_component").options[3].split(" ·")[0]
    at.selectbox("routes_component").set_value(head).run()
    at.slider("routes_tau").set_value(0.10).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("No head is on the route at this τ" in i.value for i in at.info)
    assert not any("routes_heads" in c.proto.id for c in at.get("plotly_chart"))
    assert at.selectbox("routes_component").value == head != "L0H0"
