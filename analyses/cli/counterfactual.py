"""``sonde run counterfactual`` and ``sonde run bias-sweep`` (Gumbel-Max counterfactual generation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .options import config_option
from .common import planned, save_result, data_file, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress_bar, saved, status


def register(run_app: typer.Typer) -> None:
    @run_app.command("counterfactual")
    @model_options
    def counterfactual(
        model: str = ModelOpt,
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
        intervene: str = typer.Option("none", "--intervene",
                                      help="'token:12=Maeve' (response token 12; a leading space is added when the replaced "
                                           "token starts a word; quote it, 'token:12=\"Maeve\"', to force it exactly as "
                                           "written; 'token:12=id:4312' for an id), 'prompt:Lyra->Maeve', "
                                           "'ablate:L5H3[,L2N17]' or 'none'."),
        observed: Optional[str] = typer.Option(None, "--observed", help="Explain this response text instead of sampling one (noise is inferred)."),
        temperature: float = config_option("counterfactual", "temperature"),
        top_k: Optional[int] = config_option("counterfactual", "top_k"),
        top_p: Optional[float] = config_option("counterfactual", "top_p"),
        max_new_tokens: int = config_option("counterfactual", "max_new_tokens"),
        seed: int = config_option("counterfactual", "seed"),
        n_samples: int = config_option("counterfactual", "n_samples", "--samples"),
        noise: str = config_option("counterfactual", "noise"),
        multi_token: str = config_option("counterfactual", "multi_token"),
        chat: bool = config_option("counterfactual", "chat", "--chat"),
        interventional: bool = config_option("counterfactual", "interventional", "--interventional/--no-interventional"),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Factual generation and its counterfactual under an intervention, with the same Gumbel noise."""
        from analyses import counterfactual as cf

        config = cf.Config(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                           n_samples=n_samples, noise=noise, multi_token=multi_token, chat=chat,
                           interventional=interventional)
        cf.parse_intervention(intervene)  # fail before loading the model
        from analyses.core.planner import tokens_bound

        config = planned(config, model, device, dtype, seq_len=tokens_bound(prompt, model=model), prompt_bound=True)
        probe = load_probe(model, backend, device, dtype)
        with status("Generating"):
            r = cf.run(probe, prompt, intervene, config=config, observed=observed)
        path = save_result(r, out)
        div = r.divergence_frame()
        forced = [{"id": t, "token": s} for t, s in zip(r.forced, r.forced_str)]
        summary = {"intervention": r.intervention, "factual": r.factual_text,
                   "counterfactual": r.texts("counterfactual"), "interventional": r.texts("interventional"),
                   "divergence": json.loads(div.to_json(orient="records")), "notes": list(r.notes)}
        if r.forced:
            summary["forced"] = {"position": r.edit_pos, "replaced": {"id": r.factual[r.edit_pos], "token": r.factual_str[r.edit_pos]},
                                 "tokens": forced}
        if as_json:
            saved(path, True, summary)
            return
        typer.echo(f"intervention: {r.intervention}")
        for n in r.notes:
            typer.echo(f"note: {n}")
        if r.forced:
            toks = " ".join(f"{s!r} (id {t})" for t, s in zip(r.forced, r.forced_str))
            typer.echo(f"forced at response position {r.edit_pos}: {toks}, replacing {r.factual_str[r.edit_pos]!r} "
                       f"(id {r.factual[r.edit_pos]})")
        typer.echo(f"factual:        {r.factual_text!r}")
        for t in r.texts("counterfactual"):
            typer.echo(f"counterfactual: {t!r}")
        for t in r.texts("interventional"):
            typer.echo(f"interventional: {t!r}")
        typer.echo(div.to_string(index=False))
        typer.echo(f"saved {path}")

    @run_app.command("bias-sweep")

    @model_options
    def bias_sweep(
        model: str = ModelOpt,
        template: str = config_option("counterfactual_bias", "template", cls="BiasConfig"),
        groups: str = config_option("counterfactual_bias", "groups", cls="BiasConfig",
                                    help="Comma-separated values; the first is the factual world."),
        categories: Optional[Path] = typer.Option(None, "--categories",
                                                  help="JSON file {category: regex}; default: occupation categories.",
                                                  callback=data_file("categories file")),
        n_samples: int = config_option("counterfactual_bias", "n_samples", "--samples", cls="BiasConfig"),
        max_new_tokens: int = config_option("counterfactual_bias", "max_new_tokens", cls="BiasConfig"),
        temperature: float = config_option("counterfactual_bias", "temperature", cls="BiasConfig"),
        top_k: Optional[int] = config_option("counterfactual_bias", "top_k", cls="BiasConfig"),
        top_p: Optional[float] = config_option("counterfactual_bias", "top_p", cls="BiasConfig"),
        seed: int = config_option("counterfactual_bias", "seed", cls="BiasConfig"),
        chat: bool = config_option("counterfactual_bias", "chat", "--chat", cls="BiasConfig"),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Swap a protagonist attribute with the same noise and compare extracted attributes (with intervals)."""
        from analyses import counterfactual as cf
        from analyses.core.io import read_text
        from probes import InputError

        cats = cf.DEFAULT_CATEGORIES
        if categories is not None:
            try:
                cats = json.loads(read_text(categories))
            except json.JSONDecodeError as e:
                raise InputError(f"--categories {categories} is not valid JSON ({e}).", hint='Write {"doctor": "\\\\bdoctor\\\\b", ...}.') from None
            if not isinstance(cats, dict) or not all(isinstance(v, str) for v in cats.values()):
                raise InputError(f"--categories {categories} must hold one JSON object of category -> regex.")
        config = cf.BiasConfig(template=template, groups=tuple(g.strip() for g in groups.split(",")),
                               categories=tuple(cats.items()), n_samples=n_samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat)
        from analyses.core.planner import tokens_bound

        config = planned(config, model, device, dtype, seq_len=tokens_bound(template + max(config.groups, key=len), model=model), prompt_bound=True)
        probe = load_probe(model, backend, device, dtype)
        with progress_bar() as bar:
            r = cf.bias_sweep(probe, config=config, progress=bar)
        path = save_result(r, out)
        s = r.summary[r.summary["count"] > 0]
        if as_json:
            saved(path, True, {"summary": json.loads(s.to_json(orient="records"))})
            return
        typer.echo(s[["group", "category", "count", "p", "p_lo", "p_hi", "shift", "shift_lo", "shift_hi"]].to_string(index=False, float_format="%.3f"))
        u = r.summary.drop_duplicates("group")[["group", "unchanged", "unchanged_lo", "unchanged_hi"]]
        typer.echo(u.to_string(index=False, float_format="%.3f"))
        typer.echo(f"saved {path}")
