"""One declaration per analysis: the registry lists every method once, the infrastructure reads it (and never
imports a method module by name), keys come from the analysis's own inputs, and the same inputs get the same key
whether they run in one pass or in shards."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import tiny_models

ROOT = Path(__file__).resolve().parents[1]
METHODS = {p.stem for p in (ROOT / "analyses").glob("*.py") if p.stem != "__init__"}


@pytest.fixture(scope="module")
def llama(one_thread):
    return tiny_models.probe("llama")


def test_every_method_is_declared_once_with_its_parts():
    from analyses.core import registry

    specs = registry.all_analyses()
    assert {"logit_lens", "routes", "routes.dataset", "sinks", "dormant", "bigram", "fiber", "critical", "counterfactual",
            "counterfactual.bias", "bb-toy", "component"} <= set(specs)
    clis = [s.cli for s in specs.values() if s.cli]
    assert len(clis) == len(set(clis))  # one verb, one analysis
    for name, s in specs.items():
        assert s.result.analysis == name and issubclass(s.config, object)
        assert registry.signature_matches(s) == [], f"{name}: prepare takes what run does not"
        if s.prepare is not None:  # config is keyword-only in every entry point that takes inputs
            p = inspect.signature(s.run).parameters["config"]
            assert p.kind is p.KEYWORD_ONLY, name
    assert registry.shardable("routes").name == "routes.dataset" and registry.shardable("sinks").name == "sinks"
    assert set(registry.sweepable()) == {"sinks", "logit-lens", "routes"}
    with pytest.raises(Exception, match="cannot be swept over shards.*sinks"):
        registry.shardable("bigram")


def _imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 2 and mod:  # from ..routes import X
                out.add(mod.split(".")[0])
            if node.level == 2 and not mod:  # from .. import routes
                out.update(a.name for a in node.names)
            if mod.startswith("analyses.") and not mod.startswith(("analyses.core", "analyses.cli")):
                out.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("analyses.") and
                       not a.name.startswith(("analyses.core", "analyses.cli")))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "analyses" / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_a_method_module_by_name(path):
    assert not (_imported_modules(path) & METHODS), f"{path.name} imports {_imported_modules(path) & METHODS}"


def test_core_names_no_method():
    """The infrastructure holds no per-method branches (the words of the old if-chains are gone)."""
    for name in ("checkpoints.py", "cluster.py", "planner.py"):
        text = (ROOT / "analyses" / "core" / name).read_text()
        for needle in ("sinks.SinksResult", "routes.RouteStatsResult", "logit_lens.LogitLensResult", "SHARDABLE",
                       "_routes_chunk", 'analysis == "sinks"', 'kind == "routes"'):
            assert needle not in text, f"{name} still holds {needle!r}"


def test_one_ablation_spelling(llama):
    from analyses import routes
    from probes import Ablate, InputError, as_edits, site

    cfg = routes.Config(level="head")
    obj = Ablate(site("z", 1).name, heads=[1])
    keys = {routes.result_key(llama, "abc d", config=cfg, edits=e) for e in ([obj], obj, ["L1H1"], "L1H1", ["ablate:l1h1"])}
    assert len(keys) == 1
    assert routes.run(llama, "abc d", config=cfg, edits="L1H1").key in keys
    assert [type(e).__name__ for e in as_edits(["L0N3", "L1FFN"], llama.info)] == ["Ablate", "Ablate"]
    for bad, msg in ((["L9H0"], "layer 9 does not exist"), ([3], "not an edit"), (7, "must be a list of edits")):
        with pytest.raises(InputError, match=msg):
            routes.run(llama, "abc d", config=cfg, edits=bad)


def test_python_api_misuse_is_one_clear_error(llama):
    from analyses import bigram, dormant, logit_lens, routes, sinks
    from probes import ConfigError, InputError

    cases = [
        (lambda: routes.run(llama, None), InputError, "one prompt"),
        (lambda: routes.run("embedded", "abc"), InputError, "needs a loaded probe.*load_model\\('embedded'\\)"),
        (lambda: sinks.run(llama, config={"T": 8}), ConfigError, "got a dict.*from_dict"),
        (lambda: logit_lens.run(llama, b"abc"), InputError, "got bytes"),
        (lambda: dormant.run(llama, "code"), InputError, "got the string 'code'.*\\['code'\\]"),
        (lambda: bigram.run(llama, 3.5), InputError, "corpus must be"),
        (lambda: routes.run_dataset(llama, "abc"), InputError, "list of prompts"),
    ]
    for fn, err, msg in cases:
        with pytest.raises(err, match=msg):
            fn()


def test_dataset_keys_come_from_the_records_and_one_pass_equals_shards(llama, tmp_path, monkeypatch):
    """Two datasets with the same config get two keys (both results are kept); the same records get the
    same key in one pass and in a sharded sweep, whatever the shard size."""
    from analyses import routes, sinks
    from analyses.core import cluster, store
    from analyses.core.io import Record

    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "store"))
    cfg = routes.DatasetConfig(max_tokens=6)
    a = [Record(text="abc def ghi", domain="x"), Record(text="jkl mno", domain="y")]
    b = [Record(text="abc def ghx", domain="x"), Record(text="jkl mno", domain="y")]
    ra, rb = routes.run_dataset(llama, a, config=cfg), routes.run_dataset(llama, b, config=cfg)
    assert ra.key != rb.key and ra.key == routes.dataset_key(llama, a, config=cfg)
    pa, pb = ra.save(), rb.save()
    assert pa != pb and store.read_manifest(pa)["input_hash"] != store.read_manifest(pb)["input_hash"]
    for size in (1, 2):
        run = cluster.sweep("routes", a, config=cfg, engine=cluster.LocalEngine(llama),
                            sweep_config=cluster.SweepConfig(shard_size=size, max_retries=0))
        assert run.result.key == ra.key
        assert torch.equal(run.result.head_mean, ra.head_mean)

    scfg = sinks.Config(T=6, n_samples=4, batch_size=2, mlp_ablation=False)
    texts = ["abc def ghi jkl", "mno pqr stu vwx", "one two three four five", "six seven eight nine ten"]
    one = sinks.run(llama, texts, config=scfg)
    shard = cluster.sweep("sinks", texts, config=scfg, engine=cluster.LocalEngine(llama),
                          sweep_config=cluster.SweepConfig(shard_size=2, max_retries=0)).result
    assert shard.key == one.key == sinks.result_key(llama, texts, config=scfg)


def test_store_refuses_same_key_other_inputs(llama, tmp_path, monkeypatch):
    """A folder holding this key with another input hash is never replaced (a key must name one computation)."""
    import json

    from analyses import logit_lens
    from analyses.core import store

    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path))
    res = logit_lens.run(llama, "abc d", config=logit_lens.Config(k=2))
    path = res.save()
    man = json.loads((path / "manifest.json").read_text())
    man["input_hash"] = "0" * 16  # the same key written for other inputs (as a caller-made key once allowed)
    (path / "manifest.json").write_text(json.dumps(man))
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(store.ResultExistsError, match="same key but other inputs"):
        res.save()
    assert sorted(p.name for p in path.iterdir()) == before
    assert json.loads((path / "manifest.json").read_text())["input_hash"] == "0" * 16


def test_planner_reads_each_analysis_memory_model():
    from analyses import bigram, counterfactual, dormant, routes, sinks
    from analyses.core import planner

    assert planner.memory_model("sinks") is sinks.MEMORY and planner.memory_model("dormant") is dormant.MEMORY
    assert planner.memory_model("routes") is routes.MEMORY and planner.memory_model("bigram") is bigram.MEMORY
    # a further verb of an analysis has the memory model declared with it
    assert planner.memory_model("bigram-eval") is bigram.EVAL_MEMORY and planner.analysis_of("bigram-eval")[0] is bigram.SPEC
    # critical: its rollout engine's own terms; counterfactual and the bias sweep: their sampler's terms
    from analyses import critical

    assert planner.memory_model("critical") is critical.MEMORY and critical.MEMORY.batch_field == "batch_size"
    assert planner.memory_model("bias-sweep").parts is counterfactual.sampling_memory
    assert set(planner.kinds()) >= {"forward", "generate", "sinks", "dormant", "routes", "bigram", "bigram-eval", "critical",
                                    "counterfactual", "bias-sweep", "fiber"}


def test_old_results_load_through_the_registry(tmp_path, llama):
    """load_result finds a result's class through the registry (dotted names such as routes.dataset included)."""
    from analyses import routes
    from analyses.core.base import load_result

    res = routes.run_dataset(llama, ["abc def ghi"], config=routes.DatasetConfig(max_tokens=6))
    back = load_result(res.save(tmp_path / "r"))
    assert type(back) is routes.RouteStatsResult and back.key == res.key


def test_every_declared_verb_is_a_sonde_run_verb_and_every_page_exists():
    """The CLI and the dashboard hold a verb and a page for each declaration (and the CLI no analysis verb that is
    not declared, besides its tools: sweep, cdpo, contrastive-train; bigram-eval is declared as a further verb of bigram)."""
    import typer.main

    from analyses.cli import run_app
    from analyses.core import registry

    verbs = {c.name for c in typer.main.get_command(run_app).commands.values()}
    declared = {s.cli for s in registry.all_analyses().values() if s.cli}
    further = {v for s in registry.all_analyses().values() for v, _ in s.verbs}
    assert declared | further <= verbs
    assert verbs - declared - further == {"sweep", "cdpo", "contrastive-train"}
    pages = {p.stem for p in (ROOT / "dashboard" / "views").glob("*.py")}
    assert {s.page for s in registry.all_analyses().values() if s.page} <= pages


def test_results_say_what_their_inputs_were(llama, tmp_path):
    """The manifest keeps a readable summary of the inputs (the prompt's first characters, a row count), which
    `sonde results ls` lists beside the analysis, model, date and key."""
    from analyses import logit_lens, routes, sinks
    from analyses.core import store

    logit_lens.run(llama, "abc de", config=logit_lens.Config(k=2)).save(tmp_path / "lens")
    routes.run_dataset(llama, ["abc def", "ghi jkl"], config=routes.DatasetConfig(max_tokens=6)).save(tmp_path / "ds")
    sinks.run(llama, domain="prose", config=sinks.Config(T=6, n_samples=2, batch_size=2, mlp_ablation=False)).save(tmp_path / "s")
    df = store.list_results(tmp_path).set_index("analysis")
    from analyses.core import registry

    want = registry.tokens_label(llama, llama.to_tokens("abc de", prepend_bos=False))
    assert df.loc["logit_lens", "inputs"] == want and want.endswith(" tokens)") and "c" in want
    assert df.loc["routes.dataset", "inputs"].startswith("2 records")
    assert df.loc["sinks", "inputs"].startswith("prose: 2 rows of 6 tokens")


def test_the_docs_index_comes_from_the_registry():
    """Each declared analysis has its section in docs/readme, and the README lists them in the registry's order."""
    from analyses.core import registry
    from docs_numbers import builder

    build_readme = builder()

    sections = registry.doc_sections()
    assert all((ROOT / "docs" / "readme" / f"{d}.md").is_file() for d in sections)
    assert build_readme.analyses_sections() == [d for d in sections if d != "overview"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    titles = [readme.index(f"](docs/readme/{d}.md)") for d in build_readme.analyses_sections()]
    assert titles == sorted(titles)  # the gallery lists them in the registry's order, each with its first command
    modules = build_readme.api_modules()["analyses"]
    assert all(spec.run.__module__ in modules for spec in registry.all_analyses().values())  # and the API reference documents each
