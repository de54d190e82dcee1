"""Stored-format fixtures: small results of several analyses on tiny random models, written once with the
result classes' former hand-written save code into ``tests/data/stored/``, and a content signature of each
saved folder. ``python tests/stored_results.py OUT`` writes the folders and ``OUT/signatures.json``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

VOLATILE = ("created_at", "versions")  # manifest entries that differ between two saves of the same result
#: the store's bookkeeping, not the result: format version, the files written (sizes, hashes) and the signature
BOOKKEEPING = ("format", "files", "user_files", "signature")


def signature(folder: str | Path) -> dict:
    """What a result folder holds, independent of when and with which library versions it was written:
    the manifest (less :data:`VOLATILE` and :data:`BOOKKEEPING`), each table's columns, dtypes and values, each array's dtype,
    shape and bytes."""
    from safetensors.torch import load_file

    p = Path(folder)
    man = json.loads((p / "manifest.json").read_text())
    out = {"manifest": {k: _small(v) for k, v in man.items() if k not in VOLATILE + BOOKKEEPING}, "tables": {}, "arrays": {}}
    for name in man["tables"]:
        df = pd.read_parquet(p / f"{name}.parquet")
        body = df.to_json(orient="split", double_precision=15, default_handler=str)
        out["tables"][name] = {"columns": [str(c) for c in df.columns], "dtypes": [str(d) for d in df.dtypes],
                               "sha256": hashlib.sha256(body.encode()).hexdigest()}
    if (p / "arrays.safetensors").is_file():
        for k, v in sorted(load_file(str(p / "arrays.safetensors")).items()):
            out["arrays"][k] = {"dtype": str(v.dtype), "shape": list(v.shape),
                                "sha256": hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()}
    return out


def _small(v):
    """Long manifest entries (mask shapes, calibration grids) as a digest of their canonical JSON."""
    text = json.dumps(v, sort_keys=True)
    return v if len(text) <= 1000 else {"sha256": hashlib.sha256(text.encode()).hexdigest()}


def make_all(root: str | Path) -> dict[str, Path]:
    """Save one small result per analysis under ``root`` (tiny random models, CPU)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny_models
    from analyses import bigram, counterfactual, dormant, fiber, logit_lens, routes, sinks

    root = Path(root)
    torch.manual_seed(0)
    p = tiny_models.probe("llama", backend="nnsight")
    out = {}
    out["bigram_default"] = bigram.default_result().save(root / "bigram_default")
    out["routes"] = routes.run(p, "The cat sat on the mat", config=routes.Config(tau=0.05)).save(root / "routes")
    out["logit_lens"] = logit_lens.run(p, "The cat sat", config=logit_lens.Config(k=2)).save(root / "logit_lens")
    g = torch.Generator().manual_seed(0)
    out["fiber"] = fiber.run(embeddings=torch.randn(64, 6, generator=g),
                             config=fiber.Config(vol_min=2, vol_max=40, window=4, n_sims=200, keep_curves="all",
                                                 n_neighbors=5)).save(root / "fiber")
    toks = torch.randint(0, 200, (4, 16), generator=g)
    out["sinks"] = sinks.run(p, tokens=toks, config=sinks.Config(T=16, n_samples=4, batch_size=2, ablation_layers=1,
                                                                 ablation_samples=2)).save(root / "sinks")
    out["dormant"] = dormant.run(p, {"mine": [" ".join(["the cat sat on the mat"] * 6)] * 2},
                                 config=dormant.Config(T=16, n_samples=2, batch_size=2, max_heads=1)).save(root / "dormant")
    out["counterfactual"] = counterfactual.run(p, "The cat", "ablate:L0H0", config=counterfactual.Config(
        max_new_tokens=4, n_samples=2)).save(root / "counterfactual")
    return out


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    made = make_all(dest)
    sigs = {k: signature(v) for k, v in made.items()}
    (dest / "signatures.json").write_text(json.dumps(sigs, indent=1, sort_keys=True))
    print({k: str(v) for k, v in made.items()})
