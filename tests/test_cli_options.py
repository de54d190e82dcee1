"""CLI options mirror their config fields: every option of ``sonde run`` routes, fiber, counterfactual, bias-sweep,
sinks, dormant and logit-lens that names a config field has that field's default (no default is written twice),
and the CLI's static reading of the configs (no torch import) agrees with the imported dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from analyses import counterfactual, counterfactual_bias, dormant, fiber, logit_lens, routes, routes_dataset, sinks
from analyses.cli import app
from analyses.cli.options import NOT_STATIC, cli_default, config_fields

# the model-loading and output options every verb shares (common.py), not analysis settings
SHARED = {"model", "backend", "device", "dtype", "out", "as_json", "replace"}
# the CLI takes a JSON file of categories, the config the pairs; --n-random defaults to the analysis's own default, which
# differs between one prompt (routes.faithfulness: 10) and a dataset (DatasetConfig: 4 per prompt)
OTHER_MEANING = {("bias-sweep", "categories"), ("routes", "n_random")}
VERBS = {
    "routes": ([routes.Config, routes.DatasetConfig],
               {"tau", "renormalize", "level", "p", "include_bias", "position", "mode", "kernel", "prepend_bos", "max_tokens",
                "seed"}),
    "fiber": ([fiber.Config], {"matrix", "matrix_key", "tokens", "vol_min", "vol_max", "window", "alpha", "n_strata", "mode",
                               "correction", "keep_curves", "block_size"}),
    "counterfactual": ([counterfactual.Config], {"temperature", "top_k", "top_p", "max_new_tokens", "seed", "n_samples",
                                                 "noise", "multi_token", "chat", "interventional"}),
    "bias-sweep": ([counterfactual.BiasConfig], {"template", "groups", "n_samples", "max_new_tokens", "temperature", "top_k",
                                                 "top_p", "seed", "chat"}),
    "sinks": ([sinks.Config], {"eps", "positions", "T", "n_samples", "bos", "batch_size", "mlp_ablation"}),
    "dormant": ([dormant.Config], {"theta", "sink_pos", "heads", "max_heads", "intervention", "T", "n_samples", "bos"}),
    "logit-lens": ([logit_lens.Config], {"layers", "k", "prepend_bos"}),
}


def _defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_cli_option_default_is_its_config_default(verb):
    classes, want = VERBS[verb]
    cmd = typer.main.get_command(app).commands["run"].commands[verb]
    seen = set()
    for p in cmd.params:
        if p.param_type_name != "option" or p.name in SHARED or (verb, p.name) in OTHER_MEANING:
            continue
        cls = next((c for c in classes if p.name in _defaults(c)), None)
        if cls is None:
            continue
        seen.add(p.name)
        assert p.default == cli_default(_defaults(cls)[p.name]), (verb, p.name, p.default)
    assert seen == want


@pytest.mark.parametrize("module,cls", [(routes, "Config"), (routes_dataset, "DatasetConfig"), (fiber, "Config"),
                                        (counterfactual, "Config"), (counterfactual_bias, "BiasConfig"), (sinks, "Config"),
                                        (dormant, "Config"), (logit_lens, "Config")])
def test_static_config_reading_matches_the_dataclass(module, cls):
    static = config_fields(module.__name__.split(".", 1)[1], cls)
    real = _defaults(getattr(module, cls))
    assert set(static) == set(real)
    for name, spec in static.items():
        if spec.default is not NOT_STATIC:
            assert spec.default == real[name], (cls, name)
            assert type(spec.default) is type(real[name]), (cls, name)
