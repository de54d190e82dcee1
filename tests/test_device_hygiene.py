"""Device hygiene without a GPU: no host round trip inside per-layer loops, no host tensor meeting a device tensor.

A CPU run cannot see a GPU stall, so :class:`DeviceWatch` (a ``TorchFunctionMode``) replays the GPU's rules on
the CPU. Tensors made by a factory call without ``device=`` (``torch.zeros(3)``, ``torch.tensor([...])``), by
``.cpu()`` / ``.to("cpu")``, and everything computed only from such tensors, count as *host* tensors; everything
else (weights, activations, anything made with ``device=`` or moved with ``.to(probe.device)``) counts as being on
the *device*. Two things are recorded:

* **host syncs**: ``.item()``, ``.tolist()``, ``.numpy()``, ``float()``/``int()``/``bool()``, ``.cpu()``,
  ``nonzero``/``unique``/... on a device tensor, called from ``analyses/`` or ``probes/``. A sync is *in a
  loop* when device work (model code, a matmul/softmax/norm/topk-class op, or an op with at least ``BULK``
  outputs) follows it before the next sync; a run of small finalizing copies at the end of an analysis counts once.
* **mixes**: an op whose inputs hold a host tensor (not a 0-d scalar) and a device tensor: on CUDA that op
  raises ``Expected all tensors to be on the same device``.

Each analysis runs on a tiny random llama with 2 layers and on its 4-layer twin whose extra layers add exact zeros
(``o_proj`` and ``down_proj`` zeroed), so both give the same logits, samples and control flow. The in-loop sync
count must not grow with depth, except at source lines that say ``host sync`` in a comment (the top-down route
walk needs one per layer to choose the next rows); there must be no mix. The detector's own tests show it fails
on a reducer that syncs per layer and on a host tensor added to an activation.
"""

from __future__ import annotations

import collections
import linecache
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tiny_models
from probes import Reducer, from_hf

ROOT = str(Path(__file__).resolve().parents[1]) + os.sep
OURS = (ROOT + "analyses" + os.sep, ROOT + "probes" + os.sep)
TORCH_DIR = os.path.dirname(torch.__file__)
SYNCS = {"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero", "argwhere", "unique",
         "masked_select", "cpu", "__iter__", "__len__"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "randn", "rand",
             "randint", "randperm", "eye", "from_numpy", "tril_indices", "triu_indices"}
HEAVY = {"linear", "matmul", "einsum", "bmm", "baddbmm", "addmm", "mm", "scaled_dot_product_attention", "softmax",
         "log_softmax", "norm", "cdist", "topk", "embedding", "sort", "cumsum", "multinomial"}
THIN = (os.sep + "_tensor.py", os.sep + "functional.py", os.sep + "overrides.py", os.sep + "_device.py")  # thin wrappers
BULK = 2048  # an elementwise op with this many outputs is work too (a tiny model's weight matrix has 4096+)
MOVES = {"to", "copy_", "cpu", "as_tensor", "tensor", "set_", "__get__", "__set__", "equal"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put", "index_select", "gather", "scatter", "take_along_dim"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):  # includes torch.return_types (values, indices)
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _on_host(t: torch.Tensor) -> bool:
    return getattr(t, "_sonde_host", False)


class DeviceWatch(TorchFunctionMode):
    """Records host syncs and host/device mixes of a CPU run as if the probe's device were a GPU."""

    def __init__(self, ours: tuple[str, ...] = OURS):
        super().__init__()
        self.ours = ours
        self.events: list[tuple] = []  # ("sync", name, file, line) | ("work", name, file, line)
        self.mixes: list[tuple] = []

    def _where(self) -> tuple[str, int]:
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.startswith(TORCH_DIR):
            if not f.f_code.co_filename.endswith(THIN):  # torch's own routines (optimizers, modules) are "lib"
                return "lib", 0
            f = f.f_back
        if f is None:
            return "lib", 0
        fn = f.f_code.co_filename
        return (os.path.relpath(fn, ROOT) if fn.startswith(self.ours) else "lib"), f.f_lineno

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        ins = list(_tensors((args, kwargs)))
        out = func(*args, **kwargs)
        rest = list(args[1:]) + list(kwargs.values())
        to_host = name == "cpu" or (name == "to" and any(isinstance(a, str) and a == "cpu" for a in rest))
        to_device = name == "to" and any(isinstance(a, torch.device) for a in rest)
        if name not in MOVES and ins:
            hosts = [t for t in ins if _on_host(t) and t.dim() > 0]
            if hosts and any(not _on_host(t) for t in ins):
                target = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if name not in INDEXING or (target is not None and _on_host(target)):
                    self.mixes.append((name, *self._where()))
        if (name in SYNCS or to_host) and ins and not _on_host(ins[0]):
            where = self._where()
            if where[0] != "lib":
                self.events.append(("sync", name, *where))
        if name in FACTORIES:
            host = "device" not in kwargs and not (ins and not _on_host(ins[0]))
        elif to_host or to_device:
            host = to_host
            if out is (args[0] if args else None):  # a no-op move on this CPU: a fresh alias carries the mark
                out = out.view_as(out)
        else:
            host = bool(ins) and all(_on_host(t) for t in ins)
        outs = list(_tensors(out))
        for o in outs:
            try:
                o._sonde_host = host
            except (AttributeError, RuntimeError):
                pass
        if outs and not host and name not in SYNCS:
            where = self._where()
            if where[0] == "lib" or name in HEAVY or max(o.numel() for o in outs) >= BULK:
                self.events.append(("work", name, *where))
        return out

    def loop_syncs(self) -> collections.Counter:
        """Syncs followed by device work before the next sync, by (name, file, line)."""
        out, pending = collections.Counter(), None
        for e in self.events:
            if e[0] == "sync":
                pending = e[1:]
            elif pending is not None:
                out[pending] += 1
                pending = None
        return out


def deep_twin(n_layers: int):
    """Tiny llama with ``n_layers`` layers; layers from 2 on add exact zeros (same function as the 2-layer model)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_models.config("llama")
    cfg.num_hidden_layers = n_layers
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in m.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return from_hf(m, tiny_models.tokenizer(), name=f"tiny-llama-{n_layers}")


def _logit_lens(p):
    from analyses import logit_lens as ll

    ll.run(p, "abc def gh", config=ll.Config(k=3))


def _routes(mode="all", level="head"):
    def run(p):
        from analyses import routes

        routes.run(p, "abc def gh", config=routes.Config(kernel="eager", mode=mode, level=level))
    return run


def _routes_dataset(p):
    from analyses import routes
    from analyses.core.io import Record

    recs = [Record(text=t, domain=d) for t, d in [("abc def", "a"), ("ghi jk", "b")]]
    routes.run_dataset(p, recs, config=routes.DatasetConfig(kernel="eager"))


def _sinks(p):
    from analyses import sinks

    toks = torch.randint(4, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    sinks.run(p, tokens=toks, config=sinks.Config(T=32, n_samples=4, batch_size=2, mlp_ablation=True, ablation_layers=2,
                                                  ablation_samples=2))


def _dormant(p):
    from analyses import dormant

    dormant.run(p, ["prose"], config=dormant.Config(T=32, n_samples=4, batch_size=4, heads=("L1H0",)))


def _bigram(p):
    from analyses import bigram as B

    ids = torch.randint(4, 40, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = B.Config(lam=1.0, lr=1e-3, steps=2, batch=2, seq_len=16, reuse=True, log_every=1, stop_undecided=None)
    B.train_mask(p, ids[:3200].reshape(-1, 16), B.BigramTable.from_ids(ids, 256), cfg)


def _critical(p):
    from analyses import critical as C
    from analyses.tasks import CallableChecker

    cfg = C.Config(n_rollouts=4, max_new_tokens=3, stop_at_answer=False, alternatives="topk", n_alternatives=2, alt_rollouts=2)
    C.search(p, [1] + list(b"Q: 2+3=? A:"), list(b"ab cd Z e"), CallableChecker(lambda t: "Z" not in t), config=cfg)


def _counterfactual(p):
    from analyses import counterfactual as cf

    cfg = cf.Config(max_new_tokens=6, seed=8, temperature=1.0, n_samples=2, stop_at_eos=False, noise="posterior")
    cf.run(p, "hello there", "token:3=id:120", config=cfg)


def _component(p):
    from analyses import component as CP

    CP.profile(p, "L1H2", config=CP.Config(domains=("random", "repeat"), n_samples=2, T=8, k=3), root=tempfile.mkdtemp())


ANALYSES = {
    "logit_lens": _logit_lens, "routes_all": _routes(), "routes_top_down": _routes(mode="route"),
    "routes_neuron": _routes(level="neuron"), "routes_dataset": _routes_dataset, "sinks": _sinks, "dormant": _dormant, "bigram_step": _bigram,
    "critical": _critical, "counterfactual": _counterfactual, "component": _component,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls on 2 shared cores run faster on one thread


def _watch(fn, n_layers: int, ours: tuple[str, ...] = OURS) -> DeviceWatch:
    p = deep_twin(n_layers)
    with DeviceWatch(ours) as w:
        fn(p)
    return w


def _growth(fn, ours: tuple[str, ...] = OURS) -> tuple[collections.Counter, DeviceWatch, DeviceWatch]:
    a, b = _watch(fn, 2, ours), _watch(fn, 4, ours)
    return b.loop_syncs() - a.loop_syncs(), a, b


def _declared(key) -> bool:
    """A sync at a source line that says ``host sync`` in a comment is deliberate (one per layer at most)."""
    _, file, line = key
    return "host sync" in linecache.getline(ROOT + file, line)


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_no_host_sync_per_layer_and_no_host_device_mix(name):
    grow, a, b = _growth(ANALYSES[name])
    undeclared = {k: v for k, v in grow.items() if not _declared(k)}
    assert not undeclared, f"{name}: host syncs inside a per-layer loop (extra syncs with 2 more layers): {undeclared}"
    assert not a.mixes and not b.mixes, f"{name}: host tensors meet device tensors (fails on CUDA): {collections.Counter(b.mixes)}"


def test_routes_top_down_declares_its_one_sync_per_layer():
    grow, _, _ = _growth(ANALYSES["routes_top_down"])
    assert sum(grow.values()) == 2 and all(_declared(k) for k in grow)  # 2 more layers, one row choice each


# ----------------------------------------------------------------------------- the detector can fail
class _SyncingNorm(Reducer):
    """A bad reducer: reads a number back to the host at every layer."""

    def __init__(self):
        super().__init__(dims=None)
        self.seen = []

    def _update(self, x):
        self.seen.append(float(x.float().norm()))

    def _state(self):
        return {}

    def finalize(self):
        return self.seen


class _HostAdd(Reducer):
    """A bad reducer: adds a tensor made without ``device=`` to the activation."""

    def __init__(self):
        super().__init__(dims=None)

    def _update(self, x):
        self.last = x + torch.arange(x.shape[-1], dtype=x.dtype)

    def _state(self):
        return {}

    def finalize(self):
        return None


def test_detector_sees_a_sync_per_layer_and_a_host_tensor():
    here = OURS + (str(Path(__file__).resolve()),)
    ids = torch.tensor([[1, 5, 6, 7]])

    def syncs(p):
        p.run(ids, reads={f"blocks.{L}.hook_resid_post": _SyncingNorm() for L in range(p.info.n_layers)})

    grow, _, _ = _growth(syncs, here)
    assert sum(grow.values()) == 2 and all(k[0] == "__float__" for k in grow), grow

    def copies(p):  # a per-layer device-to-host copy inside the hooks (Collect's default)
        from probes import Collect

        p.run(ids, reads={f"blocks.{L}.hook_resid_post": Collect() for L in range(p.info.n_layers)})

    grow, _, _ = _growth(copies)
    assert sum(grow.values()) == 2 and all(k[1] == "probes/reducers.py" and not _declared(k) for k in grow), grow

    def mixes(p):
        p.run(ids, reads={"blocks.0.hook_resid_post": _HostAdd()})

    assert [m[0] for m in _watch(mixes, 2, here).mixes] == ["add"]


# ----------------------------------------------------------------------------- device flags and device maps
def test_cuda_without_cuda_is_one_clean_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from conftest import run_cli

    for dev in ("cuda", "cuda:1"):
        code, out, err = run_cli(["run", "logit-lens", "--prompt", "abc", "--device", dev], capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and lines and lines[0].startswith("error: ") and "CUDA" in lines[0], err
        assert "Traceback" not in err


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"])
def test_device_map_on_cpu_gives_the_plain_numbers(tmp_path, device_map):
    from analyses import logit_lens as ll
    from analyses import sinks
    from probes import load_model

    m, tok = tiny_models.build("llama")
    m.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    tok.save_pretrained(tmp_path / "tiny")
    plain = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")
    mapped = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32", device_map=device_map)
    assert str(mapped.device) == "cpu"
    a, b = ll.run(plain, "abc def", config=ll.Config(k=3)), ll.run(mapped, "abc def", config=ll.Config(k=3))
    torch.testing.assert_close(a.top_probs, b.top_probs, rtol=0, atol=1e-6)
    toks = torch.randint(4, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = sinks.Config(T=16, n_samples=2, batch_size=2, mlp_ablation=False)
    sa, sb = sinks.run(plain, tokens=toks, config=cfg), sinks.run(mapped, tokens=toks, config=cfg)
    torch.testing.assert_close(sa.alpha_mean, sb.alpha_mean, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_every_analysis_runs_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p = deep_twin(2)
    p.hf_model.to("cuda")
    assert p.device.type == "cuda"
    ANALYSES[name](p)  # a host tensor meeting a device tensor raises here
