"""``sonde run routes``: information-flow routes of one prompt, or route statistics over a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress, saved, status

__all__ = ["register"]


def register(run_app: typer.Typer) -> None:
    @run_app.command("routes")
    def routes_cmd(
        model: str = ModelOpt,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text whose routes to compute."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="Dataset mode: JSONL (fields 'text', optional 'domain') or text file."),
        position: int = typer.Option(-1, "--position", help="Prediction position of the route (-1 = last token)."),
        tau: float = typer.Option(0.04, "--tau", help="Edge threshold in (0, 1) (LLM-TT default 0.04)."),
        renormalize: bool = typer.Option(True, "--renormalize/--no-renormalize", help="Renormalise after thresholding."),
        level: str = typer.Option("token", "--level", help="token, head or neuron."),
        p: float = typer.Option(1.0, "--p", help="Proximity norm (1 = L1)."),
        include_bias: bool = typer.Option(False, "--include-bias", help="Count the attention output bias as its own part."),
        max_tokens: int = typer.Option(128, "--max-tokens", help="Dataset mode: cut prompts to this many tokens."),
        graphml: Optional[Path] = typer.Option(None, "--graphml", help="Also write the route as GraphML to this file."),
        on_error: str = typer.Option("stop", "--on-error", help="Malformed input line: stop or skip."),
        out: Optional[Path] = OutOpt,
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Information-flow routes (Ferrando & Voita 2024): edge importances of every block, the route to a prediction."""
        from analyses import routes
        from probes import InputError

        if (prompt is None) == (input is None):
            raise InputError("give exactly one of --prompt or --input.", hint="--prompt TEXT for one prompt, --input FILE.jsonl for a dataset.")
        if graphml is not None and input is not None:
            raise InputError("--graphml needs --prompt (a dataset has no single route).")
        common = dict(tau=tau, renormalize=renormalize, level=level, p=p, include_bias=include_bias, position=position)
        if prompt is not None:
            cfg = routes.Config(**common)
            probe = load_probe(model, backend, device, dtype)
            with status("Computing routes"):
                res = routes.run(probe, prompt, config=cfg)
            path = res.save(out)
            if graphml is not None:
                res.to_graphml(graphml)
            r = res.route()
            hi = res.head_importance(route=r)
            top = sorted(((float(hi[l, h]), f"L{l}H{h}") for l in range(hi.shape[0]) for h in range(hi.shape[1])), reverse=True)[:5]
            saved(path, as_json, {"tokens": res.n_tokens, "position": res.position, "route_nodes": r.number_of_nodes(),
                                  "route_edges": r.number_of_edges(),
                                  "top_heads": ", ".join(f"{n}={v:.3f}" for v, n in top if v > 0) or "none",
                                  "seconds": round(sum(res.timings.values()), 2)})
            return

        from analyses.io import Checkpoint, iter_records
        from analyses.store import hash_inputs, result_key, results_root

        cfg = routes.DatasetConfig(**common, max_tokens=max_tokens)
        if not input.is_file():
            raise InputError(f"file {str(input)!r} does not exist.", hint="Check the --input path.")
        data = input.read_bytes()
        records = list(iter_records(input, on_error=on_error))
        if not records:
            raise InputError(f"{str(input)!r} holds no prompts.", hint="Put one JSON object per line with a 'text' field.")
        probe = load_probe(model, backend, device, dtype)
        ih = hash_inputs(data)
        key = result_key(routes.RouteStatsResult.analysis, probe.info.fingerprint, cfg.to_dict(), ih)
        out_dir = Path(out) if out is not None else results_root() / key
        ck = Checkpoint(out_dir.parent / f".{out_dir.name}.progress", fingerprint=key)
        with progress(len(records), "routes") as step:
            res = routes.run_dataset(probe, records, config=cfg, checkpoint=ck, on_progress=step, input_hash=ih)
        path = res.save(out_dir)
        ck.clear()
        saved(path, as_json, {"prompts": int(res.n.sum()), "skipped": res.n_skipped, "domains": ", ".join(res.domains)})
