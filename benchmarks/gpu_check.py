"""One prepared GPU check: every GPU goal measured in one run, written to one JSON and one Markdown table.

    python benchmarks/gpu_check.py --out $OUT          # one CUDA GPU, random-weight Llama-3-8B shape in bf16, ≤ 8 min
    python benchmarks/gpu_check.py --tiny --out /tmp/x # a dry run of every section on a tiny shape (CPU or GPU, < 1 min)
    SONDE_GPU_CHECK_TINY=1 python benchmarks/gpu_check.py   # the same as --tiny

Sections (each with its own time budget and try/except: a failure or a timeout leaves the other sections' figures):

* ``routes``: plain forward vs routes all-position and top-down at T = 512 and 2048 (ratios, peak memory), then
  top-down at the model's full context, T = 8192 (time and peak memory against a plain forward of the same input);
* ``sinks``: sink/dormant statistics throughput vs plain forward on 64 × 512 tokens;
* ``fiber``: kNN radii of a random 128,256 × 4,096 bf16 matrix (time, peak memory), then the whole
  fiber test on a subset of query tokens;
* ``counterfactual``: the Gumbel-Max factual decode loop vs HF ``generate(do_sample=True)``, same length;
* ``critical``: critical-token rollouts (shared prefix cache) vs batched ``generate`` tokens/s;
* ``pytest_gpu``: the suite's ``gpu``-marked tests (``pytest -m gpu``);
* ``agreement``: bf16 vs fp32 of the same random weights (final logits, lens probabilities, sink α) on the
  big shape, and the tiny test models' bf16-on-GPU vs fp32-on-CPU differences against the CPU tolerances.

The model is built from a ``LlamaConfig`` with random weights (nothing is downloaded; the embedded model's weights
are not needed). Token ids are drawn at random. Peak memory is ``torch.cuda.max_memory_allocated`` (CPU: max RSS).
Needs torch, transformers and nnsight (plus the project's pure-Python deps): see ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256)

#: sizes and per-section time budgets (seconds); the full run's budgets add up to about 7 minutes
FULL = dict(shape=LLAMA3_8B, lengths=(512, 2048), long=8192, sinks=(64, 512, 8), fiber=(128256, 4096, 2048), fiber_vol=(10, 1000),
            cf_tokens=64, crit=(32, 256, 64),
            budgets=dict(setup=60, routes=170, sinks=45, fiber=50, counterfactual=30, critical=30, pytest_gpu=50, agreement=40))
#: the dry run: every code path on a tiny shape; budgets are loose (a shared CPU may be slow), not a speed goal
SMALL = dict(shape=TINY, lengths=(16, 32), long=128, sinks=(4, 32, 2), fiber=(600, 16, 50), fiber_vol=(10, 60), cf_tokens=6,
             crit=(4, 16, 4), budgets=dict(setup=300, routes=300, sinks=300, fiber=300, counterfactual=300, critical=300,
                                           pytest_gpu=300, agreement=300))
GPU_TEST_FILES = ("tests/test_scale_models.py", "tests/test_dtypes.py", "tests/test_device_hygiene.py")


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (checked between Python bytecodes)."""
    def fire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Check:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.size = SMALL if self.tiny else FULL
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.dev.type == "cuda"
        self.dtype = torch.bfloat16
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tiny": self.tiny,
                              "device": str(self.dev), "sections": {}}
        self.t0 = time.perf_counter()
        self.probe = None

    # ------------------------------------------------------------------ helpers
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, repeat: int = 1):
        """(best seconds over ``repeat`` runs, last result); the caller warms up first."""
        best, out = float("inf"), None
        for _ in range(repeat):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def ids(self, b: int, t: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(4, self.probe.info.d_vocab, (b, t), generator=g).to(self.dev)

    def section(self, name: str, fn):
        rec = self.results["sections"].setdefault(name, {})
        secs = self.size["budgets"][name]
        start = time.perf_counter()
        print(f"[gpu_check] {name} (budget {secs} s) ...", flush=True)
        try:
            with budget(secs):
                fn(rec)
            rec["status"] = "ok"
        except SectionTimeout as e:
            rec["status"] = f"timeout: {e}"
        except Exception as e:  # one failure must leave the other sections' figures
            rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
        self.write()

    # ------------------------------------------------------------------ sections
    def setup(self, rec):
        import transformers as T

        rec["torch"], rec["transformers"] = torch.__version__, T.__version__
        rec["python"] = platform.python_version()
        try:
            import nnsight

            rec["nnsight"] = getattr(nnsight, "__version__", "?")
        except ImportError as e:
            rec["nnsight"] = f"missing ({e})"
        if self.cuda:
            rec["gpu"] = torch.cuda.get_device_name(0)
            rec["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        import tiny_models
        from probes import from_hf

        cfg = T.LlamaConfig(**self.size["shape"], architectures=["LlamaForCausalLM"])
        rec["shape"] = "llama3-8b (random weights)" if not self.tiny else "tiny llama (random weights)"
        self.reset_peak()
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.device(self.dev):
            model = T.AutoModelForCausalLM.from_config(cfg, dtype=self.dtype).eval()
        self.sync()
        rec["build_s"] = round(time.perf_counter() - t, 2)
        self.probe = from_hf(model, tiny_models.tokenizer(), name="random-llama3-8b" if not self.tiny else "random-tiny")
        rec["params"] = self.probe.info.n_params
        rec["weights_mib"] = self.peak_mib()

    def routes(self, rec):
        from analyses import routes

        p = self.probe
        kernel = "compiled" if self.cuda else "eager"
        rec["kernel"] = kernel
        rows = rec.setdefault("lengths", {})
        for T in self.size["lengths"]:
            r = rows.setdefault(str(T), {})
            x = self.ids(1, T)
            fwd = lambda: p.forward(x)  # noqa: E731
            fwd()
            r["forward_s"], _ = self.timed(fwd, 3)
            cfg = routes.Config(kernel=kernel, max_memory_gb=100.0, mode="all")
            # predict the all-position cost from the previous length (∝ T²) and skip what cannot fit the budget
            prev = rows.get(str(self.size["lengths"][0]), {}).get("all_s")
            left = self._left()
            if prev is not None and T != self.size["lengths"][0] and prev * (T / self.size["lengths"][0]) ** 2 * 2 > left:
                r["all_s"] = None
                r["all_note"] = f"skipped: predicted {prev * (T / self.size['lengths'][0]) ** 2:.0f} s > {left:.0f} s left"
            else:
                t = time.perf_counter()
                routes.run(p, x, config=cfg)  # warm-up (compiles the kernel for this shape)
                self.sync()
                r["all_warmup_s"] = round(time.perf_counter() - t, 2)
                self.reset_peak()
                r["all_s"], res = self.timed(lambda: routes.run(p, x, config=cfg))
                r["all_peak_mib"] = self.peak_mib()
                r["all_ratio"] = round(r["all_s"] / r["forward_s"], 2)
                del res
            tcfg = cfg.replace(mode="route")
            routes.run(p, x, config=tcfg)
            self.reset_peak()
            r["top_down_s"], res = self.timed(lambda: routes.run(p, x, config=tcfg))
            r["top_down_peak_mib"] = self.peak_mib()
            r["top_down_ratio"] = round(r["top_down_s"] / r["forward_s"], 2)
            r["top_down_rows"] = int(res.computed.sum()) if res.computed is not None else None
            del res
        self._long_route(rec, kernel)
        rec["compile_failed"] = list(routes._COMPILE_FAILED)  # non-empty: the eager kernel was timed instead

    def _long_route(self, rec, kernel: str):
        """Top-down at the model's full context (T = 8192 on the big shape, bf16): each layer's residuals, q, k and v
        stay in bf16 until the walk (about 9.7 GB here), the walk recomputes only the pattern rows it visits."""
        from analyses import routes

        p, T = self.probe, self.size["long"]
        r = rec.setdefault("long", {"T": T})
        x = self.ids(1, T, seed=1)
        last = rec["lengths"].get(str(self.size["lengths"][-1]), {}).get("top_down_s")
        if last is not None and last * (T / self.size["lengths"][-1]) * 3 > self._left():
            r["note"] = f"skipped: predicted {last * T / self.size['lengths'][-1]:.0f} s x 3 > {self._left():.0f} s left"
            return
        self.reset_peak()
        r["forward_s"], _ = self.timed(lambda: p.forward(x))
        r["forward_peak_mib"] = self.peak_mib()
        cfg = routes.Config(kernel=kernel, max_memory_gb=100.0, mode="route")
        r["store_mib"] = round(routes._top_down_bytes(p.info, T, self.dtype.itemsize) / 2**20, 1)
        self.reset_peak()
        r["top_down_s"], res = self.timed(lambda: routes.run(p, x, config=cfg))
        r["top_down_peak_mib"] = self.peak_mib()
        r["top_down_ratio"] = round(r["top_down_s"] / r["forward_s"], 2)
        r["peak_ratio"] = round(r["top_down_peak_mib"] / r["forward_peak_mib"], 2)
        r["visited_rows"] = int(res.computed.sum())
        g = res.route()
        r["route"] = f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges"
        del res

    def _left(self) -> float:
        return float(getattr(signal, "getitimer")(signal.ITIMER_REAL)[0])

    def sinks(self, rec):
        from analyses import sinks

        p = self.probe
        n, T, bs = self.size["sinks"]
        x = self.ids(n, T, seed=1)
        rec.update(samples=n, T=T, batch_size=bs)

        def plain():
            for i in range(0, n, bs):
                p.forward(x[i:i + bs])

        def stats():
            return sinks.collect_stats(p, x, positions=(0,), batch_size=bs, values=True, resid=True)

        p.forward(x[:bs])
        self.reset_peak()
        rec["forward_s"], _ = self.timed(plain)
        rec["forward_peak_mib"] = self.peak_mib()
        stats()
        self.reset_peak()
        rec["stats_s"], st = self.timed(stats)
        rec["stats_peak_mib"] = self.peak_mib()
        rec["throughput_ratio"] = round(rec["forward_s"] / rec["stats_s"], 3)  # goal ≥ 0.7
        rec["tokens_per_s_forward"] = round(n * T / rec["forward_s"], 1)
        rec["tokens_per_s_stats"] = round(n * T / rec["stats_s"], 1)
        rec["alpha_finite"] = bool(torch.isfinite(st["alpha_mean"]).all())

    def fiber(self, rec):
        from analyses import fiber as F

        V, d, q = self.size["fiber"]
        g = torch.Generator(device=self.dev).manual_seed(0)
        X = torch.randn(V, d, generator=g, device=self.dev, dtype=self.dtype)
        rec.update(rows=V, dim=d, dtype=str(X.dtype))
        vmin, vmax = self.size["fiber_vol"]
        cfg = F.Config(vol_min=vmin, vol_max=vmax)
        k = cfg.vol_max
        self.reset_peak()
        t = time.perf_counter()
        dist, _ = F.knn_distances(X, k, block_size=cfg.block_size)
        self.sync()
        rec["knn_all_rows_s"] = round(time.perf_counter() - t, 2)
        rec["knn_peak_mib"] = self.peak_mib()
        rec["knn_k"] = k
        del dist
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:q].sort().values.tolist()
        self.reset_peak()
        t = time.perf_counter()
        r = F.run(embeddings=X, token_strs=[f"t{i}" for i in range(V)], config=cfg.replace(tokens=tuple(ids), keep_curves="none"))
        self.sync()
        rec["run_queries"] = q
        rec["run_s"] = round(time.perf_counter() - t, 2)
        rec["run_peak_mib"] = self.peak_mib()
        rec["run_timings"] = {k: round(v, 2) for k, v in dict(r.timings).items()}

    def counterfactual(self, rec):
        from analyses import counterfactual as cf

        p = self.probe
        n = self.size["cf_tokens"]
        prompt = "Once upon a time, Lyra lived in a small village by the sea. Every morning she"
        cfg = cf.Config(max_new_tokens=n, temperature=0.8, seed=1, interventional=False, stop_at_eos=False)
        ids = p.to_tokens(prompt)
        pad = p.tokenizer.eos_token_id

        def vanilla():
            return p.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=True, temperature=0.8, top_k=0, pad_token_id=pad)

        vanilla()
        cf.generate(p, prompt, cfg)
        rec["tokens"] = n
        rec["generate_s"], _ = self.timed(vanilla, 2)
        rec["factual_s"], _ = self.timed(lambda: cf.generate(p, prompt, cfg), 2)
        rec["ratio"] = round(rec["factual_s"] / rec["generate_s"], 3)  # goal ≤ 1.1
        t = time.perf_counter()
        r = cf.run(p, prompt, f"token:{n // 2}=id:{int(ids[0, -1])}", config=cfg)
        self.sync()
        rec["token_edit_run_s"] = round(time.perf_counter() - t, 3)
        rec["token_edit_timings"] = {k: round(v, 3) for k, v in dict(r.timings).items()}

    def critical(self, rec):
        from analyses import critical as C

        p = self.probe
        batch, plen, new = self.size["crit"]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, min(p.info.d_vocab, 30000), (plen,), generator=g).tolist()
        prompt, resp = ids[: plen // 2], ids[plen // 2:]
        cfg = C.Config(n_rollouts=batch, batch_size=batch, max_new_tokens=new, stop_at_answer=False, temperature=1.0)
        eos = sorted(C._eos_ids(p))
        never = lambda t: False  # noqa: E731

        def plain():
            x = torch.tensor([ids], device=self.dev).expand(batch, -1)
            return p.hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                                       max_new_tokens=new, min_new_tokens=new, pad_token_id=eos[0] if eos else 0)

        plain()
        self.reset_peak()
        t_plain, out = self.timed(plain)
        n_plain = (out.shape[1] - len(ids)) * batch
        C.rollout_success(p, prompt, resp, len(resp), never, batch, cfg)
        t_roll, _ = self.timed(lambda: C.rollout_success(p, prompt, resp, len(resp), never, batch, cfg))
        n_roll = new * batch
        rec.update(batch=batch, prompt_tokens=plen, new_tokens=new, generate_tok_s=round(n_plain / t_plain, 1),
                   rollout_tok_s=round(n_roll / t_roll, 1), ratio=round((n_roll / t_roll) / (n_plain / t_plain), 3),
                   peak_mib=self.peak_mib())  # goal ratio ≥ 0.8

    def pytest_gpu(self, rec):
        files = [f for f in GPU_TEST_FILES if (ROOT / f).is_file()]
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "gpu", "-q", "-rs",
               "--continue-on-collection-errors", *files]
        if self.tiny:
            cmd.append("--collect-only")  # the dry run checks the command and the collection, not the GPU
        rec["command"] = " ".join(cmd[1:])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1")
        left = max(5.0, self._left() - 3)
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            rec["returncode"] = out.returncode
            tail = (out.stdout + out.stderr).strip().splitlines()
            rec["summary"] = tail[-1] if tail else ""
            rec["output_tail"] = "\n".join(tail[-40:])
        except subprocess.TimeoutExpired as e:
            rec["returncode"] = None
            rec["summary"] = f"timed out after {left:.0f} s"
            rec["output_tail"] = str(e.stdout or "")[-3000:]

    def agreement(self, rec):
        """bf16 vs fp32 of the same weights, on this device; the tiny families against the CPU tolerances."""
        from analyses import logit_lens as ll
        from analyses import sinks

        import test_dtypes as TD

        # tiny families: bf16 on this device vs fp32 on the CPU, measured like the CPU test
        fams = rec.setdefault("tiny_families", {})
        for fam in ("llama", "gpt2", "qwen2"):
            try:
                p32, p16 = TD.twins(fam)
                p16.hf_model.to(self.dev)
                m = {**TD.m_logit_lens(p32, p16), **TD.m_sinks(p32, p16)}
                if fam != "qwen2":
                    m.update(TD.m_routes(p32, p16))
                fams[fam] = {k: {"max": float(f"{v:.3g}"), "cpu_bound": TD.TOL[k], "within": v <= TD.TOL[k]} for k, v in m.items()}
            except Exception as e:  # e.g. a discrete outcome that disagreed: record it, go on
                fams[fam] = {"error": {"max": None, "cpu_bound": None, "within": False, "what": f"{type(e).__name__}: {e}"[:300]}}
        # the big shape: bf16 then fp32 of the same (bf16-drawn) weights
        p = self.probe
        T = min(self.size["lengths"])
        x = self.ids(2, T, seed=3)
        big = {}
        layers = tuple(sorted({0, p.info.n_layers // 2, p.info.n_layers - 1}))
        l16 = p.forward(x).float()
        lens16 = ll.run(p, x[0], config=ll.Config(k=3, layers=layers))
        s16 = sinks.collect_stats(p, x, positions=(0,), batch_size=2, values=False, resid=False)
        p.hf_model.float()
        try:
            l32 = p.forward(x).float()
            lens32 = ll.run(p, x[0], config=ll.Config(k=3, layers=layers))
            s32 = sinks.collect_stats(p, x, positions=(0,), batch_size=2, values=False, resid=False)
        finally:
            p.hf_model.to(self.dtype)
        lp16, lp32 = torch.log_softmax(l16, -1), torch.log_softmax(l32, -1)
        big["final_logprob_maxabs"] = float((lp16 - lp32).abs().max())
        big["final_top1_agree"] = float((l16.argmax(-1) == l32.argmax(-1)).float().mean())
        big["lens_top_probs_maxabs"] = float((lens16.top_probs - lens32.top_probs).abs().max())
        big["lens_target_maxabs"] = float((lens16.target - lens32.target).abs().max())
        big["sink_alpha_maxabs"] = float((s16["alpha_mean"] - s32["alpha_mean"]).abs().max())
        rec["big_shape"] = {k: float(f"{v:.4g}") for k, v in big.items()}

    # ------------------------------------------------------------------ output
    def write(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(self.results))

    def run(self):
        only = set(self.args.sections.split(",")) if self.args.sections else None
        self.section("setup", self.setup)
        if self.probe is None:
            return
        for name in ("routes", "sinks", "fiber", "counterfactual", "critical", "pytest_gpu", "agreement"):
            if only is None or name in only:
                self.section(name, getattr(self, name))


def _f(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def markdown(r: dict) -> str:
    """The check's figures as one Markdown table (section | measure | figure)."""
    s = r["sections"]
    rows = []
    st = s.get("setup", {})
    rows.append(("setup", "device / model", f"{st.get('gpu', r['device'])}, {st.get('shape', '?')}, bf16, "
                 f"torch {st.get('torch', '?')}, build {_f(st.get('build_s'), ' s')}"))
    if s.get("routes", {}).get("compile_failed"):
        rows.append(("routes", "kernel", "torch.compile failed, eager kernel timed: " + s["routes"]["compile_failed"][0].replace("|", "/")))
    for T, v in s.get("routes", {}).get("lengths", {}).items():
        rows.append(("routes", f"all-position, T={T}", f"{_f(v.get('all_ratio'), '×')} forward ({_f(v.get('all_s'), ' s')} vs "
                     f"{_f(v.get('forward_s'), ' s')}); peak {_f(v.get('all_peak_mib'), ' MiB')}" + (f" ({v['all_note']})" if v.get("all_note") else "")))
        rows.append(("routes", f"top-down, T={T}", f"{_f(v.get('top_down_ratio'), '×')} forward ({_f(v.get('top_down_s'), ' s')}); "
                     f"peak {_f(v.get('top_down_peak_mib'), ' MiB')}"))
    v = s.get("routes", {}).get("long", {})
    if v:
        rows.append(("routes", f"top-down, full context T={v['T']}", v["note"] if "note" in v else
                     f"{_f(v.get('top_down_ratio'), '×')} forward ({_f(v.get('top_down_s'), ' s')} vs {_f(v.get('forward_s'), ' s')}); "
                     f"peak {_f(v.get('top_down_peak_mib'), ' MiB')} ({_f(v.get('peak_ratio'), '×')} the forward's "
                     f"{_f(v.get('forward_peak_mib'), ' MiB')}); layer store {_f(v.get('store_mib'), ' MiB')}; {v.get('route', '')}"))
    v = s.get("sinks", {})
    if "stats_s" in v:
        rows.append(("sinks", f"statistics throughput, {v['samples']}×{v['T']} tokens", f"{_f(v.get('throughput_ratio'), '×')} plain forward "
                     f"(goal ≥ 0.7×); peak {_f(v.get('stats_peak_mib'), ' MiB')} vs {_f(v.get('forward_peak_mib'), ' MiB')}"))
    v = s.get("fiber", {})
    if "knn_all_rows_s" in v:
        rows.append(("fiber", f"kNN radii, {v['rows']:,}×{v['dim']:,} bf16, k={v['knn_k']}", f"{_f(v['knn_all_rows_s'], ' s')}; peak {_f(v.get('knn_peak_mib'), ' MiB')}"))
    if "run_s" in v:
        rows.append(("fiber", f"whole test, {v['run_queries']} query tokens", f"{_f(v['run_s'], ' s')}; peak {_f(v.get('run_peak_mib'), ' MiB')}"))
    v = s.get("counterfactual", {})
    if "ratio" in v:
        rows.append(("counterfactual", f"factual Gumbel-Max decode, {v['tokens']} tokens", f"{_f(v['ratio'], '×')} HF generate "
                     f"({_f(v['factual_s'], ' s')} vs {_f(v['generate_s'], ' s')}; goal ≤ 1.1×)"))
    v = s.get("critical", {})
    if "ratio" in v:
        rows.append(("critical", f"rollouts, batch {v['batch']}, {v['new_tokens']} new tokens", f"{_f(v['ratio'], '×')} generate tokens/s "
                     f"({_f(v['rollout_tok_s'])} vs {_f(v['generate_tok_s'])} tok/s; goal ≥ 0.8×)"))
    v = s.get("pytest_gpu", {})
    if "summary" in v:
        rows.append(("pytest -m gpu", "gpu-marked tests", v["summary"].replace("|", "/")))
    v = s.get("agreement", {})
    for k, x in v.get("big_shape", {}).items():
        rows.append(("bf16 vs fp32", f"big shape: {k}", _f(x)))
    for fam, m in v.get("tiny_families", {}).items():
        bad = [k for k, x in m.items() if not x["within"]]
        rows.append(("bf16 vs fp32", f"tiny {fam} (GPU bf16 vs CPU fp32)", "within the CPU bounds" if not bad else f"over: {', '.join(bad)}"))
    for name, v in s.items():
        if v.get("status", "ok") != "ok":
            rows.append((name, "status", v["status"].replace("|", "/")))
    lines = [f"# GPU check — {r['started']} ({'tiny dry run' if r['tiny'] else 'full'}, {r['device']}, {r.get('elapsed_s', '?')} s)", "",
             "| section | measure | figure |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("SONDE_GPU_CHECK_TINY", "") not in ("", "0"),
                    help="tiny shape and sizes: a dry run of every section (also SONDE_GPU_CHECK_TINY=1)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--sections", default=None, help="comma-separated subset of the sections (setup always runs)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: the full GPU check needs a CUDA GPU; use --tiny for a dry run on this machine.", file=sys.stderr)
        return 2
    chk = Check(args)
    chk.run()
    chk.write()
    print(markdown(chk.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
