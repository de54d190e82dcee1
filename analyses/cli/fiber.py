"""``sonde run fiber``: fiber-bundle / manifold test of a model's token embeddings (Robinson et al. 2025)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import config_option
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
        matrix: str = config_option("fiber", "matrix"),
        matrix_key: Optional[str] = config_option("fiber", "matrix_key"),
        tokens: Optional[str] = config_option("fiber", "tokens"),
        vol_min: int = config_option("fiber", "vol_min"),
        vol_max: int = config_option("fiber", "vol_max"),
        window: int = config_option("fiber", "window"),
        alpha: float = config_option("fiber", "alpha"),
        n_strata: int = config_option("fiber", "n_strata"),
        mode: str = config_option("fiber", "mode"),
        correction: str = config_option("fiber", "correction"),
        keep_curves: str = config_option("fiber", "keep_curves"),
        block_size: int = config_option("fiber", "block_size"),
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
