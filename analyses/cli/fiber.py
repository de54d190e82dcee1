"""``sonde run fiber``: fiber-bundle / manifold test of a model's token embeddings (Robinson et al. 2025)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import BackendOpt, DeviceOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress, saved


def parse_tokens(spec: str | None) -> tuple[int, ...] | None:
    """``"0:5000"``, ``"0:49152:10"``, ``"17,42,99"`` or a mix (``"0:100,500"``) → row ids; ``None``/``"all"`` = all."""
    from probes import ConfigError

    if spec is None or spec.strip() in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                a = [int(x) for x in part.split(":")]
                out.extend(range(*a))
            else:
                out.append(int(part))
    except (ValueError, TypeError):
        raise ConfigError(f"--tokens {spec!r} is not a list of ids or ranges.",
                          hint="Use e.g. --tokens 0:5000, --tokens 0:49152:10 or --tokens 17,42,99.") from None
    if not out:
        raise ConfigError(f"--tokens {spec!r} selects no token.", hint="Give a non-empty range, e.g. 0:5000.")
    return tuple(dict.fromkeys(out))


def register(run_app: typer.Typer) -> None:
    @run_app.command("fiber")
    def fiber(
        model: str = ModelOpt,
        matrix: str = typer.Option("input", "--matrix", help="input (W_E), output (W_U.T, if untied), or FILE.npy / FILE.safetensors."),
        matrix_key: Optional[str] = typer.Option(None, "--matrix-key", help="Tensor name in a .safetensors file with several."),
        tokens: Optional[str] = typer.Option(None, "--tokens", help="Rows to test: 0:5000, 0:49152:10, 17,42 (default all)."),
        vol_min: int = typer.Option(10, "--vol-min", help="Smallest neighbour rank used."),
        vol_max: int = typer.Option(1000, "--vol-max", help="Largest neighbour rank + 1."),
        window: int = typer.Option(10, "--window", help="Welch window size."),
        alpha: float = typer.Option(1e-3, "--alpha", help="Per-token level."),
        n_strata: int = typer.Option(3, "--n-strata", help="Sequential change searches."),
        mode: str = typer.Option("calibrated", "--mode", help="calibrated (scan-corrected) or parity (published procedure)."),
        correction: str = typer.Option("none", "--correction", help="Verdict columns use none, holm or bh (all three are reported)."),
        keep_curves: str = typer.Option("rejected", "--keep-curves", help="Keep radii of all, rejected or none of the tokens."),
        block_size: int = typer.Option(2048, "--block-size", help="Query rows per kNN block."),
        backend: str = BackendOpt, device: str = DeviceOpt,
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Fiber-bundle / manifold test of token embeddings: per-token verdicts, p-values, local dimensions."""
        from analyses import fiber as F

        cfg = F.Config(matrix=matrix, matrix_key=matrix_key, tokens=parse_tokens(tokens), vol_min=vol_min, vol_max=vol_max,
                       window=window, alpha=alpha, n_strata=n_strata, mode=mode, correction=correction,  # type: ignore[arg-type]
                       keep_curves=keep_curves, block_size=block_size, device="auto" if device == "auto" else device)  # type: ignore[arg-type]
        probe = None if matrix not in ("input", "output") and model == "embedded" else load_probe(model, backend, "cpu")
        with progress(None, "kNN blocks") as step:
            def cb(done: int, total: int) -> None:
                step.set(done, total)

            res = F.run(probe, config=cfg, progress=cb)
        path = res.save(out)
        summ = res.summary()
        saved(path, as_json, summ)
