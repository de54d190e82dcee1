"""``sonde run logit-lens``: the logit lens of one prompt, saved to the results store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import config_option
from .common import planned, check_side_file, save_result, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, saved, status


def _layer_spans(text: Optional[str]) -> list[range] | None:
    """``--layers`` as ranges, not yet expanded (``"0-99999999"`` costs nothing until checked against the model)."""
    from probes import ConfigError

    if text is None or text.strip() == "all":
        return None
    hint = "Use e.g. --layers 0,5,10 or --layers 0-29 (or 'all')."
    spans = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            a, b = part.split("-", 1) if "-" in part else (part, part)
            lo, hi = int(a), int(b)
        except ValueError:
            raise ConfigError(f"--layers {text!r} is not a list of block indices.", hint=hint) from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"--layers {text!r}: {part!r} is not a range of block indices (from low to high, from 0).", hint=hint)
        spans.append(range(lo, hi + 1))
    if not spans:
        raise ConfigError(f"--layers {text!r} names no block.", hint=hint)
    ordered = sorted(spans, key=lambda r: r.start)
    for prev, nxt in zip(ordered, ordered[1:]):
        if nxt.start <= prev[-1]:
            raise ConfigError(f"--layers {text!r} repeats block {nxt.start}.", hint="List each block once.")
    return spans


def _parse_layers(text: Optional[str], n_layers: int | None = None) -> tuple[int, ...] | None:
    """``--layers`` as block indices; with ``n_layers``, an index past the model's blocks is refused before the
    ranges are expanded."""
    from probes import ConfigError

    spans = _layer_spans(text)
    if spans is None:
        return None
    top = max(r[-1] for r in spans)
    if n_layers is not None and top >= n_layers:
        raise ConfigError(f"--layers {text!r} names block {top}, but the model has {n_layers} blocks (0..{n_layers - 1}).",
                          hint="Use e.g. --layers 0,5,10 or --layers 0-29 (or 'all').")
    return tuple(i for r in spans for i in r)


def register(run_app: typer.Typer) -> None:
    @run_app.command("logit-lens")
    @model_options
    def logit_lens_cmd(
        prompt: str = typer.Option("The Eiffel Tower is located in the city of", "--prompt", "-p", help="Text to read."),
        model: str = ModelOpt,
        layers: Optional[str] = typer.Option(None, "--layers", help="Blocks to read: 'all' (default), '0,5,10' or '10-20'."),
        k: int = config_option("logit_lens", "k", help="Top tokens kept per (layer, position)."),
        prepend_bos: bool = config_option("logit_lens", "prepend_bos", "--bos/--no-bos", help="Start the prompt with BOS."),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Optional[Path] = OutOpt,
        html: Optional[Path] = typer.Option(None, "--html", help="Also write the heat map as an HTML file."),
        as_json: bool = JsonOpt,
    ) -> None:
        """Logit lens: each layer's residual stream read through the final norm and unembedding."""
        from analyses import logit_lens

        _layer_spans(layers)  # the syntax, before the model loads; the range is checked against its blocks after
        cfg = logit_lens.Config(layers=None, k=k, prepend_bos=prepend_bos)
        check_side_file(html, "--html")
        from analyses.core.planner import tokens_bound

        cfg = planned(cfg, model, device, dtype, seq_len=tokens_bound(prompt, model=model), prompt_bound=True)
        probe = load_probe(model, backend, device, dtype)
        cfg = cfg.replace(layers=_parse_layers(layers, probe.info.n_layers))
        with status("Running the logit lens"):
            res = logit_lens.run(probe, prompt, config=cfg)
        from analyses.core.report import write_html

        path = save_result(res, out, {html: lambda tmp: write_html(res.plot(), tmp)})  # plotly.js inlined: the file opens offline
        # the first block where the lens already ranks the final prediction first, per position
        first = []
        for t in range(len(res.str_tokens)):
            hit = [res.layers[i] for i in range(len(res.layers)) if int(res.top_ids[i, t, 0]) == int(res.next_ids[t, 0])]
            first.append(hit[0] if hit else None)
        summary = {"tokens": len(res.str_tokens), "layers": len(res.layers),
                   "next_token": res.final_strs[-1], "p_next": round(float(res.next_probs[-1, 0]), 4),
                   "first_layer_top1_last_pos": first[-1], "seconds": round(sum(res.timings.values()), 3)}
        saved(path, as_json, summary)
