"""Foundation verbs: info, capture, results ls/show, dashboard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import (check_out_file, input_file, model_options, non_empty_list, writes_file, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt,
                     ModelOpt, app, echo_json, load_probe, results_app)


@app.command()


@model_options
def info(model: str = ModelOpt, backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
         hooks: bool = typer.Option(False, "--hooks", help="Also list every hook name."), as_json: bool = JsonOpt,
         trust_remote_code: bool = typer.Option(False, "--trust-remote-code")) -> None:
    """Summary of a model: layers, heads, KV heads, widths, vocabulary, parameters."""
    from probes import all_sites

    probe = load_probe(model, backend, device, dtype, trust_remote_code)
    d = probe.info.to_dict()
    if hooks:
        d["hooks"] = [s.name for s in all_sites(probe.info.n_layers) if not (s.kind == "resid_mid" and not probe.supports("resid_mid"))]
    if as_json:
        echo_json(d)
        return
    for k, v in d.items():
        if k != "hooks":
            typer.echo(f"{k:>16}: {v}")
    for h in d.get("hooks", []):
        typer.echo(h)


@app.command()
@model_options
@writes_file
def capture(
    model: str = ModelOpt,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to run."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSONL (field 'text') or text file, one prompt per line.",
                                         callback=input_file),
    hooks: str = typer.Option(..., "--hooks", help="Comma-separated hook names, e.g. blocks.3.hook_resid_post.", callback=non_empty_list),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
    on_error: str = typer.Option("stop", "--on-error", help="Malformed input line: stop or skip."),
    as_json: bool = JsonOpt,
    replace: bool = typer.Option(False, "--replace", help="Replace an existing capture file Sonde wrote (never any other file)."),
) -> None:
    """Dump activations at some hooks to a safetensors file (one entry per hook and prompt)."""
    from safetensors.torch import save_file

    from analyses.core.io import iter_records
    from probes import InputError, parse_site
    from probes.errors import user_file

    if (prompt is None) == (input is None):
        raise InputError("give exactly one of --prompt or --input.")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out} must end in .safetensors.")
    check_out_file(out, replace, _is_capture)
    probe = load_probe(model, backend, device, dtype)
    names = [h.strip() for h in hooks.split(",") if h.strip()]
    sites = [parse_site(h, probe.info.n_layers) for h in names]
    texts = [prompt] if prompt is not None else [r.text for r in iter_records(input, on_error=on_error)]
    tensors = {}
    from .common import phase_bar

    with phase_bar("capturing", len(texts), "texts") as step:
        for i, t in enumerate(texts):
            toks = probe.to_tokens(t)
            got = probe.cache(toks, sites)
            for s in sites:
                tensors[f"{i}/{s.name}"] = got[s.name][0].contiguous()
            tensors[f"{i}/tokens"] = toks[0].cpu()
            step.advance()
    import os
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with user_file(out, "the capture file", action="write", hint="Free some space, or give another --out."):  # a full disk
            save_file(tensors, tmp, metadata={"sonde": "capture", "model": probe.info.name, "fingerprint": probe.info.fingerprint,
                                              "hooks": ",".join(s.name for s in sites)})
            os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if as_json:
        echo_json({"out": str(out), "prompts": len(texts), "hooks": [s.name for s in sites]})
    else:
        typer.echo(f"wrote {len(tensors)} tensors for {len(texts)} prompt(s) to {out}")


def _is_capture(path: Path) -> bool:
    """A safetensors file written by ``sonde capture`` (its header names the hooks and the model)."""
    from analyses.core.io import _MAX_HEADER
    import json

    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n).decode()).get("__metadata__", {}) if 0 < n <= _MAX_HEADER else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and {"model", "fingerprint", "hooks"} <= set(meta)


@results_app.command("ls")
def results_ls(root: Optional[Path] = typer.Argument(None, help="Results folder (default: the store, $SONDE_RESULTS or ~/.local/share/sonde/results)."), as_json: bool = JsonOpt) -> None:
    """List saved results."""
    from analyses.core.store import list_results
    from probes.errors import InputError

    if root is not None and root.exists() and not root.is_dir():
        raise InputError(f"{str(root)!r} is not a folder of results.", hint="Give the results folder (default: $SONDE_RESULTS or ~/.local/share/sonde/results).")
    df = list_results(root)
    if as_json:
        echo_json(df.to_dict(orient="records"))
    elif df.empty:
        typer.echo("no results")
    else:
        typer.echo(df.to_string(index=False))


@results_app.command("show")
def results_show(path: Path, as_json: bool = JsonOpt) -> None:
    """Show one result's manifest and table sizes."""
    from analyses.core.store import read_result
    from probes.errors import InputError, user_file

    with user_file(path, "the result", hint="The result is damaged; re-run the analysis to write it again.", also=(RuntimeError,)):
        r = read_result(path)
    if as_json:
        echo_json(r.manifest)
        return
    m = r.manifest
    model = m.get("model")
    if not isinstance(model, dict):
        raise InputError(f"{str(path / 'manifest.json')!r} is not a Sonde manifest: its 'model' is a {type(model).__name__}, "
                         "not an object.", hint="The result is damaged; re-run the analysis to write it again.")
    typer.echo(f"analysis: {m['analysis']}\nmodel: {model.get('name')} ({model.get('fingerprint')})\ncreated: {m.get('created_at')}")
    typer.echo(f"config: {m.get('config')}")
    for name, df in r.tables.items():
        typer.echo(f"table {name}: {len(df)} rows, columns {list(df.columns)}")
    for name, a in r.arrays.items():
        typer.echo(f"array {name}: {tuple(a.shape)} {a.dtype}")


@app.command()
def dashboard(host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default loopback only)."),
              port: int = typer.Option(8501, "--port", min=1, max=65535, help="TCP port to listen on (1..65535)."),
              headless: bool = typer.Option(True, "--headless/--browser", help="Do not open a browser window.")) -> None:
    """Start the Streamlit dashboard (binds 127.0.0.1 unless --host says otherwise)."""
    from dashboard.serve import address_problem
    from probes.errors import InputError

    problem = address_problem(host, port)
    if problem:
        raise InputError(problem, hint="Use --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface), and a free --port.")
    # dashboard.serve = `streamlit run dashboard/app.py` plus a head start: the default model loads while the server starts
    cmd = [sys.executable, "-m", "dashboard.serve", "--server.address", host, "--server.port", str(port),
           "--server.headless", str(headless).lower(), "--browser.gatherUsageStats", "false"]
    typer.echo(f"Sonde dashboard on http://{host}:{port}")
    raise SystemExit(subprocess.call(cmd))
