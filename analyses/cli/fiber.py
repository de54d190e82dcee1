"""``sonde run fiber``: fiber-bundle / manifold test of a model's token embeddings (Robinson et al. 2025)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import config_option
from .common import planned, save_result, BackendOpt, DeviceOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress_bar, saved


#: more row ids than any vocabulary has (the largest are ~256k): a bigger --tokens selection is refused unexpanded
MAX_TOKEN_IDS = 1 << 22


def token_spans(spec: str | None) -> list[range] | None:
    """``--tokens`` as ranges, not yet expanded (``"0:99999999"`` costs nothing until it is checked); ``None`` = all."""
    from probes import ConfigError

    if spec is None or spec.strip() in ("", "all"):
        return None
    hint = "Use e.g. --tokens 0:5000, --tokens 0:49152:10 or --tokens 17,42,99."
    spans: list[range] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                a = [int(x) for x in part.split(":")]
                if not 2 <= len(a) <= 3 or (len(a) == 3 and a[2] == 0):
                    raise ValueError(part)
                spans.append(range(*a))
            else:
                i = int(part)
                spans.append(range(i, i + 1))
    except (ValueError, TypeError):
        raise ConfigError(f"--tokens {spec!r} is not a list of ids or ranges.", hint=hint) from None
    spans = [r for r in spans if len(r)]
    if not spans:
        raise ConfigError(f"--tokens {spec!r} selects no token.", hint="Give a non-empty range, e.g. 0:5000.")
    low = min(min(r[0], r[-1]) for r in spans)
    if low < 0:
        raise ConfigError(f"--tokens {spec!r} selects the negative id {low}.", hint=hint)
    total = sum(len(r) for r in spans)
    if total > MAX_TOKEN_IDS:
        raise ConfigError(f"--tokens {spec!r} selects {total} ids; no vocabulary has more than {MAX_TOKEN_IDS}.", hint=hint)
    return spans


def parse_tokens(spec: str | None, n_rows: int | None = None) -> tuple[int, ...] | None:
    """``"0:5000"``, ``"0:49152:10"``, ``"17,42,99"`` or a mix (``"0:100,500"``) → row ids; ``None``/``"all"`` = all.

    With ``n_rows`` (the matrix's rows), an id past the last row is refused before the ranges are expanded."""
    from probes import ConfigError

    spans = token_spans(spec)
    if spans is None:
        return None
    top = max(max(r[0], r[-1]) for r in spans)
    if n_rows is not None and top >= n_rows:
        raise ConfigError(f"--tokens {spec!r} reaches id {top}, but the matrix has {n_rows} rows (0..{n_rows - 1}).",
                          hint="Keep the ids below the vocabulary size.")
    return tuple(dict.fromkeys(i for r in spans for i in r))


def matrix_shape(path: str, key: str | None = None) -> tuple[int, ...] | None:
    """The shape of a ``.npy`` or ``.safetensors`` matrix file, read from its header only (None when the file holds
    several tensors and no ``key`` picks one). A damaged or foreign file is one error naming it."""
    from probes.errors import check_input_file, user_file

    p = check_input_file(path, "matrix file", hint="Give an existing .npy or .safetensors file.")
    with user_file(p, "matrix file", hint="Save the matrix with numpy.save or safetensors.", also=(RuntimeError,)):
        if p.suffix == ".npy":
            import numpy as np

            with p.open("rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
        else:
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as f:
                names = list(f.keys())
                name = key if key is not None else (names[0] if len(names) == 1 else None)
                if name is None or name not in names:
                    return None
                shape = f.get_slice(name).get_shape()
    return tuple(int(x) for x in shape) if len(shape) >= 1 else None


def _planning_shape(model: str, matrix: str, dims: tuple[int, ...] | None, loads: bool):
    """The sizes fiber's memory model reads (``d_vocab`` × ``d_model``: the matrix's rows and columns; the weights:
    the model's when one loads), from configs and file headers only; None when they are not known before loading."""
    from analyses.core import planner
    from probes.errors import ModelLoadError

    try:
        model_shape = planner.shape_of(model) if loads else None
    except ModelLoadError:  # a GGUF file: its sizes are known once it is loaded
        return None
    if matrix in ("input", "output"):
        return model_shape
    if dims is None or len(dims) != 2 or min(dims) < 1:
        return None
    return planner.ModelShape(n_layers=1, n_heads=1, n_kv_heads=1, d_model=dims[1], d_head=1, d_mlp=1, d_vocab=dims[0],
                              n_params=model_shape.n_params if model_shape is not None else 1)


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
        """Fiber-bundle / manifold test of token embeddings: per-token verdicts (singular, gap, no rejection), p-values, local dimensions."""
        from analyses import fiber as F

        token_spans(tokens)  # the syntax now; the ids against the matrix's rows once they are known (unexpanded)
        cfg = F.Config(matrix=matrix, matrix_key=matrix_key, tokens=None, vol_min=vol_min, vol_max=vol_max,
                       window=window, alpha=alpha, n_strata=n_strata, mode=mode, correction=correction,  # type: ignore[arg-type]
                       keep_curves=keep_curves, block_size=block_size, device="auto" if device == "auto" else device)  # type: ignore[arg-type]
        loads = matrix in ("input", "output") or model != "embedded"
        dims = matrix_shape(matrix, matrix_key) if matrix not in ("input", "output") else None
        shape = _planning_shape(model, matrix, dims, loads)
        rows = dims[0] if dims else (shape.d_vocab if shape is not None else None)
        cfg = cfg.replace(tokens=parse_tokens(tokens, rows))
        if shape is not None:
            cfg = planned(cfg, shape, device)  # before loading: the kNN block that fits
        probe = load_probe(model, backend, "cpu") if loads else None
        if rows is None and probe is not None and matrix in ("input", "output"):
            cfg = cfg.replace(tokens=parse_tokens(tokens, probe.info.d_vocab))
        with progress_bar() as bar:
            res = F.run(probe, config=cfg, progress=bar)
        path = save_result(res, out)
        summ = res.summary()
        if not as_json:  # the text line reads like the page: 1.73e-46, "< 1e-300" for an underflowed 0 (JSON keeps the float)
            from analyses.core.report import format_p

            summ["min_p"] = format_p(summ["min_p"])
        saved(path, as_json, summ)
