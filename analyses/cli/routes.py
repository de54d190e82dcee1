"""``sonde run routes``: information-flow routes of one prompt, or route statistics over a dataset.

Dataset mode reads ``--input`` (JSONL, Parquet, text, ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``) or the built-in
corpus ``--domains prose,code,arithmetic``; ``--engine local|ray`` runs it as a sharded, resumable sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import config_option
from .common import planned, check_side_file, input_file, save_result, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress_bar, saved, status
from .sweeps import (AddressOpt, EngineOpt, GpusOpt, ResumeOpt, RetriesOpt, ShardOpt, ThreadsOpt, WorkersOpt, run_sweep,
                     sweep_summary)

__all__ = ["register"]


def _echo_faithfulness(f) -> None:
    """p(target) under each ablation check, one line per ablation mode."""
    typer.echo(f"faithfulness of the route to {f.target_token!r} at position {f.position} ({len(f.heads)} heads, "
               f"{len(f.ffns)} FFNs; mean over {f.reference}): p_clean {f.p_clean:.4f}")
    for r in f.summary().itertuples():
        typer.echo(f"  {r.ablation:<4}  off-route ablated {r.p_off_route:.4f}  route ablated {r.p_route:.4f}  "
                   f"random kept {r.p_random_keep_median:.4f} (IQR {r.p_random_keep_iqr:.4f})  "
                   f"random ablated {r.p_random_median:.4f} (IQR {r.p_random_iqr:.4f})")


def _echo_explanation(ex, k: int) -> None:
    """The top query-side and key-side contributors and pairs of a QK attribution, as text."""
    model = "n/a" if ex.model_score is None else f"{ex.model_score:.4f}"
    typer.echo(f"explain {ex.label} ({ex.query_token!r} -> {ex.key_token!r}): score {ex.score:.4f} (model {model}), "
               f"attention {ex.probability:.3f}; {ex.norm} scales frozen")
    top = ex.top(k)
    for side in ("query", "key"):
        typer.echo(f"  {side}-side contributors:")
        for row in top[top.side == side].itertuples():
            typer.echo(f"    {row.component:<14} {row.contribution:+.4f}")
    typer.echo("  top pairs (query part x key part):")
    for row in ex.top_pairs(k).itertuples():
        typer.echo(f"    {row.query_component} x {row.key_component}: {row.contribution:+.4f}")


def _faith_summary(res, as_json: bool) -> dict:
    """Dataset mode with --faithfulness: the per-domain distributions (JSON), or one line per domain (text)."""
    if res.faith_n is None:
        return {}
    if as_json:
        return {"faithfulness": res.faithfulness_summary()}
    out = {}
    for dom, figs in res.faithfulness_summary().items():
        bits = [f"{name[2:]} {figs[name]['median']:.3g}" for name in ("p_clean", "p_off_route_zero", "p_route_zero",
                                                                   "p_random_zero", "p_off_route_mean", "p_route_mean")]
        out[f"faithfulness {dom} (medians)"] = ", ".join(bits)
    return out


def _report(res):
    """``--html``: the result's offline report (figure, tables, manifest)."""
    from analyses.core.report import html_report

    return lambda tmp: Path(tmp).write_bytes(html_report(res))


def _compare(routes, probe, prompt: str, cfg, model: str, prompt_b: str | None, model_b: str | None, backend: str,
             device: str, dtype: str, graphml: Path | None, html: Path | None, as_json: bool, *,
             adapter_b: Path | None = None, dtype_b: str | None = None) -> None:
    """``--compare``: routes of context a (``--prompt`` on ``--model``) and b (``--prompt-b``, ``--model-b``,
    ``--adapter-b`` and/or ``--dtype-b``), both saved in the results store, compared (:func:`analyses.routes.compare`);
    ``--graphml`` / ``--html`` export the comparison."""
    same = model_b is None and dtype_b is None
    probe_b = probe if same else load_probe(model_b or model, backend, device, dtype_b or dtype)
    if adapter_b is not None:
        with status(f"Merging the adapter {adapter_b}"):
            probe_b = probe_b.adapter_probe(adapter_b)
    text_b = prompt if prompt_b is None else prompt_b
    if (probe_b.info.n_layers, probe_b.info.n_heads) != (probe.info.n_layers, probe.info.n_heads):
        from probes import ConfigError

        raise ConfigError(f"--model-b has {probe_b.info.n_layers}x{probe_b.info.n_heads} layers x heads, --model "
                          f"{probe.info.n_layers}x{probe.info.n_heads}; routes compare on models of one shape.",
                          hint="Compare two checkpoints of one architecture, or two prompts on one model.")
    with status("Computing routes of both contexts"):
        a = routes.run(probe, prompt, config=cfg)
        b = routes.run(probe_b, text_b, config=cfg)
        labels = (routes.context_label(prompt, model),
                  routes.context_label(text_b, routes.context_model(model_b or model, adapter=adapter_b, dtype=dtype_b)))
        cmp = routes.compare(a, b, probe_a=probe, probe_b=probe_b, labels=labels)
    path_b = save_result(b, None)
    path = save_result(a, None, {graphml: cmp.to_graphml, html: lambda tmp: Path(tmp).write_bytes(cmp.report_html())})
    d = cmp.to_dict()
    if as_json:
        saved(path, True, {"result_b": str(path_b), "compare": d})
        return
    typer.echo(f"a: {labels[0]} (position {cmp.position_a})\nb: {labels[1]} (position {cmp.position_b}, offset {cmp.offset})")
    typer.echo("edges: " + ", ".join(f"{k} {d[k]}" for k in ("kept", "lost", "gained", "unaligned")))
    if cmp.delta_p is not None:
        typer.echo(f"p({cmp.target_token!r}): {cmp.p_a:.4f} (a), {cmp.p_b:.4f} (b), delta {cmp.delta_p:+.4f}")
    typer.echo("heads (b - a): " + (", ".join(f"{h['head']} {h['delta']:+.3f}" for h in d["top_head_deltas"][:5]
                                             if abs(h["delta"]) > 0) or "no change"))
    typer.echo(f"result b: {path_b}")
    saved(path, False)


def register(run_app: typer.Typer) -> None:
    @run_app.command("routes")
    @model_options
    def routes_cmd(
        model: str = ModelOpt,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text whose routes to compute."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="Dataset mode: JSONL/Parquet (fields 'text', optional 'domain'), text file or hf:NAME:SPLIT.", callback=input_file),
        position: int = config_option("routes", "position"),
        tau: float = config_option("routes", "tau"),
        renormalize: bool = config_option("routes", "renormalize"),
        level: str = config_option("routes", "level"),
        p: float = config_option("routes", "p"),
        include_bias: bool = config_option("routes", "include_bias", "--include-bias"),
        max_tokens: int = config_option("routes_dataset", "max_tokens", cls="DatasetConfig"),
        graphml: Optional[Path] = typer.Option(None, "--graphml", help="Also write the route as GraphML to this file."),
        mode: str = config_option("routes", "mode"),
        kernel: str = config_option("routes", "kernel"),
        ablate: Optional[str] = typer.Option(None, "--ablate", help="Zero-ablate heads during the pass, e.g. L5H3,L7H0 (compare routes)."),
        explain: Optional[str] = typer.Option(None, "--explain", help="QK attribution of one attention edge, LAYER HEAD @ query -> key, e.g. L5H3@12->4 (norm scales frozen)."),
        explain_top: int = typer.Option(10, "--explain-top", min=1, help="With --explain: contributors and pairs listed per side."),
        faithful: bool = typer.Option(False, "--faithfulness", help="Ablation checks of the route: p(target) with off-route / route / random components ablated (zero and mean); in dataset mode, their distributions per domain."),
        n_random: Optional[int] = typer.Option(None, "--n-random", min=0, help="With --faithfulness: random component sets of the "
                                               "route's size (default: 10 for one prompt, DatasetConfig's 4 per prompt of a dataset)."),
        seed: int = typer.Option(0, "--seed", help="With --faithfulness: seed of the random sets and the reference corpus."),
        compare: bool = typer.Option(False, "--compare", help="Two contexts side by side: --prompt on --model (a) against --prompt-b and/or --model-b (b); kept/lost/gained edges, Δ head importance, Δp."),
        prompt_b: Optional[str] = typer.Option(None, "--prompt-b", help="With --compare: the second prompt (default: --prompt)."),
        model_b: Optional[str] = typer.Option(None, "--model-b", help="With --compare: the second model, of the same shape (default: --model)."),
        adapter_b: Optional[Path] = typer.Option(None, "--adapter-b", help="With --compare: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into b's model: base vs adapter."),
        dtype_b: Optional[str] = typer.Option(None, "--dtype-b", help="With --compare: b's dtype (default --dtype), e.g. float32 vs bfloat16 of one model."),
        html: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML report (opens offline): of the result, or with --compare of the comparison."),
        on_error: str = typer.Option("stop", "--on-error", help="Malformed input line: stop or skip."),
        prepend_bos: bool = config_option("routes", "prepend_bos", "--bos/--no-bos"),
        out: Optional[Path] = OutOpt,
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        as_json: bool = JsonOpt,
        domains: Optional[str] = typer.Option(None, "--domains", help="Dataset mode on the built-in corpus, e.g. prose,code,arithmetic."),
        n_samples: int = typer.Option(32, "--n-samples", "-n", help="With --domains: texts per domain; with hf: rows read."),
        engine: Optional[str] = EngineOpt, address: Optional[str] = AddressOpt, workers: Optional[int] = WorkersOpt,
        gpus_per_worker: float = GpusOpt, shard_size: int = ShardOpt, max_retries: int = RetriesOpt, resume: bool = ResumeOpt,
        threads: int = ThreadsOpt,
    ) -> None:
        """Information-flow routes (Ferrando & Voita 2024): edge importances of every block, the route to a prediction."""
        from analyses import routes
        from probes import InputError

        if sum(x is not None for x in (prompt, input, domains)) != 1:
            raise InputError("give exactly one of --prompt, --input or --domains.",
                             hint="--prompt TEXT for one prompt, --input FILE.jsonl or --domains prose,code for a dataset.")
        if engine is not None and prompt is not None:
            raise InputError("--engine shards a dataset; one --prompt has nothing to shard.", hint="Use --input or --domains.")
        if graphml is not None and prompt is None:
            raise InputError("--graphml needs --prompt (a dataset has no single route).")
        check_side_file(graphml, "--graphml")
        check_side_file(html, "--html")
        if compare and prompt is None:
            raise InputError("--compare sets one prompt against another; give --prompt (and --prompt-b or --model-b).")
        second = {"--prompt-b": prompt_b, "--model-b": model_b, "--adapter-b": adapter_b, "--dtype-b": dtype_b}
        given = [k for k, v in second.items() if v is not None]
        if given and not compare:
            raise InputError(f"{', '.join(given)} name{'s' if len(given) == 1 else ''} the second context of --compare.", hint="Add --compare.")
        if compare and not given:
            raise InputError("--compare needs a second context: --prompt-b TEXT (same model), --model-b NAME, "
                             "--adapter-b FOLDER or --dtype-b DTYPE (same prompt).")
        if dtype_b is not None:
            import torch

            from probes.loading import resolve_dtype

            resolve_dtype(dtype_b, torch.device("cpu"))  # an unknown dtype is refused before any model loads
        if adapter_b is not None:
            from probes.weights import check_adapter_folder

            check_adapter_folder(adapter_b)  # before any model loads
        if compare and (explain is not None or faithful or ablate is not None):
            raise InputError("--compare runs on its own; --explain, --faithfulness and --ablate read one context.")
        if compare and out is not None:
            raise InputError("--out names one result; --compare saves both contexts' results in the results store.",
                             hint="Leave out --out; write the comparison with --html or --graphml.")
        common = dict(tau=tau, renormalize=renormalize, level=level, p=p, include_bias=include_bias, position=position,
                      kernel=kernel, prepend_bos=prepend_bos)
        if ablate is not None and prompt is None:
            raise InputError("--ablate compares one prompt's routes; give --prompt.")
        if explain is not None and prompt is None:
            raise InputError("--explain reads one attention edge of one prompt; give --prompt.")
        if prompt is not None:
            from probes import as_edits

            cfg = routes.Config(**common, mode=mode)  # type: ignore[arg-type]
            labels = [x.strip() for x in (ablate.split(",") if ablate else []) if x.strip()]
            as_edits(labels)  # a malformed label is refused before the model loads
            from analyses.routes_explain import parse_edge

            edge = parse_edge(explain) if explain is not None else None
            from analyses.core.planner import tokens_bound

            # before loading: the chunk budget that fits (or exit 2), for the longer of the two prompts
            cfg = planned(cfg, model, device, dtype, seq_len=tokens_bound(prompt, *([prompt_b] if prompt_b else []), model=model), prompt_bound=True)
            probe = load_probe(model, backend, device, dtype)
            edits = as_edits(labels, probe.info)
            if compare:
                return _compare(routes, probe, prompt, cfg, model, prompt_b, model_b, backend, device, dtype, graphml, html,
                                as_json, adapter_b=adapter_b, dtype_b=dtype_b)
            with status("Computing routes"):
                res = routes.run(probe, prompt, config=cfg, edits=edits)
            path = save_result(res, out, {graphml: res.to_graphml, html: _report(res)})
            from probes import head_label

            r = res.route()
            hi = res.head_importance(route=r)
            top = sorted(((float(hi[l, h]), head_label(l, h)) for l in range(hi.shape[0]) for h in range(hi.shape[1])), reverse=True)[:5]
            summary = {"tokens": res.n_tokens, "position": res.position, "route_nodes": r.number_of_nodes(),
                       "route_edges": r.number_of_edges(),
                       "top_heads": ", ".join(f"{n}={v:.3f}" for v, n in top if v > 0) or "none",
                       "seconds": round(sum(res.timings.values()), 2)}
            if edge is not None:
                with status("Explaining the attention edge"):
                    ex = routes.explain_attention(probe, prompt, *edge, config=cfg)
                if as_json:
                    summary["explain"] = ex.to_dict(explain_top)
                else:
                    _echo_explanation(ex, explain_top)
            if faithful:
                with status("Checking the route by ablation"):
                    f = routes.faithfulness(probe, prompt, config=cfg, seed=seed, result=res,
                                        **({} if n_random is None else {"n_random": n_random}))
                if as_json:
                    summary["faithfulness"] = f.to_dict()
                else:
                    _echo_faithfulness(f)
            saved(path, as_json, summary)
            return

        from analyses.core.io import Checkpoint, iter_records, work_dir
        from analyses.core.store import results_root

        from analyses.core.domains import corpus_records
        from analyses.core.io import is_hf_spec

        cfg = routes.DatasetConfig(**common, max_tokens=max_tokens, faithfulness=faithful, seed=seed,
                                   **({} if n_random is None else {"n_random": n_random}))
        if domains is not None:
            records = corpus_records([d.strip() for d in domains.split(",") if d.strip()], n=n_samples)
            src = domains
        elif is_hf_spec(input):
            records = list(iter_records(str(input), on_error=on_error, limit=n_samples))
            src = str(input)
        else:
            if not input.is_file():
                raise InputError(f"file {str(input)!r} does not exist.", hint="Check the --input path.")
            records = list(iter_records(input, on_error=on_error))
            src = str(input)
        if not records:
            raise InputError(f"{src!r} holds no prompts.", hint="Put one JSON object per line with a 'text' field.")
        if html is not None:
            raise InputError("--html reports one prompt's result; a dataset run has none yet.", hint="Give --prompt, or leave out --html.")
        if engine is not None:
            res, report, path = run_sweep("routes", records, cfg, engine=engine, address=address, workers=workers,
                                          gpus_per_worker=gpus_per_worker, shard_size=shard_size, max_retries=max_retries,
                                          resume=resume, model=model, backend=backend, device=device, dtype=dtype, out=out,
                                          source=src, threads=threads)
            saved(path, as_json, {"prompts": int(res.n.sum()), "skipped": res.n_skipped, "domains": ", ".join(res.domains),
                                  **sweep_summary(report), **_faith_summary(res, as_json)})
            return
        cfg = planned(cfg, model, device, dtype, seq_len=cfg.max_tokens)  # prompts are cut to max_tokens
        probe = load_probe(model, backend, device, dtype)
        key = routes.dataset_key(probe, records, config=cfg)  # the analysis's own key of these records
        out_dir = Path(out) if out is not None else results_root() / key
        ck = Checkpoint(work_dir(out_dir, "progress"), fingerprint=key, n_items=len(records), exact_counts=True)
        from analyses.core.cluster import _threads

        with progress_bar() as bar, _threads(threads):
            res = routes.run_dataset(probe, records, config=cfg, checkpoint=ck, progress=bar)
        path = save_result(res, out_dir)
        ck.clear()
        saved(path, as_json, {"prompts": int(res.n.sum()), "skipped": res.n_skipped, "domains": ", ".join(res.domains),
                              **_faith_summary(res, as_json)})
