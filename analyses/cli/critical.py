"""`sonde run critical` (rollout search for critical tokens) and `sonde run contrastive-train` (LoRA θ_p/θ_n)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import adapters_folder, planned, save_result, model_options, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OutOpt, load_probe, progress_bar, saved

TaskOpt = typer.Option("builtin-arith", "--task", "-t", help="builtin-arith, builtin-multistep, hf:NAME[:CONFIG]:SPLIT (Hugging Face datasets) or a GSM8K/MATH-style JSONL file.")


def register(run_app: typer.Typer) -> None:
    @run_app.command("critical")
    @model_options
    def critical(
        model: str = ModelOpt,
        task: str = TaskOpt,
        problems: int = typer.Option(1, "--problems", "-n", help="Number of problems to take from the task."),
        samples: int = typer.Option(16, "--samples", help="Trajectories sampled per problem (to find an incorrect one)."),
        rollouts: int = typer.Option(32, "--rollouts", help="Rollout budget per prefix (paper: 64). A prefix with no success needs >= 13 "
                                     "to be called hopeless at the default --alpha/--p-alive; fewer leave candidates 'undecided'."),
        sequential: bool = typer.Option(True, "--sequential/--fixed", help="SPRT: roll out in chunks and stop a prefix once decided (default), or spend the whole budget."),
        chunk: int = typer.Option(8, "--chunk", help="Rollouts decoded together in the sequential test (it reads each as it ends and stops the prefix once decided)."),
        p_alive: float = typer.Option(0.25, "--p-alive", help="Success rate the test calls 'alive' (the 'dead' level is the paper's 3/64)."),
        alpha: float = typer.Option(0.05, "--alpha", help="Error rate of each prefix test and 1 - confidence of the Clopper-Pearson intervals."),
        granularity: str = typer.Option("step", "--granularity", help="token, step or bisect."),
        bisect: bool = typer.Option(True, "--bisect/--no-bisect", help="Refine the step where the score falls to 0 by bisection."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Cap on tokens per rollout / trajectory."),
        temperature: float = typer.Option(0.7, "--temperature"),
        alternatives: str = typer.Option("sample", "--alternatives", help="Counterfactual check: sample, topk or none."),
        n_alternatives: int = typer.Option(32, "--n-alternatives"),
        batch_size: int = typer.Option(64, "--batch-size", help="Most rows of one batched decode (rollouts of a prefix, samples, alternatives)."),
        max_rollouts: int = typer.Option(20_000, "--max-rollouts", help="Refuse searches planning more rollouts than this."),
        adapters: Optional[Path] = typer.Option(None, "--adapters", help="Folder from `contrastive-train`: adds CE scores per token.",
                                                   callback=adapters_folder),
        checker: str = typer.Option("auto", "--checker", help="auto, numeric or exact (auto: numeric for number answers)."),
        engine: str = typer.Option("hf", "--engine", help="hf (Sonde's batched decode over the shared prefix cache) or vllm (CUDA, prefix caching)."),
        seed: int = typer.Option(0, "--seed"),
        on_error: str = typer.Option("stop", "--on-error", help="Malformed JSONL line: stop or skip."),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Find the tokens of failed reasoning traces after which no rollout succeeds (Lin et al. 2024)."""
        from dataclasses import replace

        from analyses import critical as C
        from analyses.tasks import load_task

        cfg = C.Config(n_samples=samples, n_rollouts=rollouts, granularity=granularity, bisect=bisect,  # type: ignore[arg-type]
                       max_new_tokens=max_new_tokens, temperature=temperature, alternatives=alternatives,  # type: ignore[arg-type]
                       n_alternatives=n_alternatives, batch_size=batch_size, max_rollouts=max_rollouts, seed=seed,
                       checker=checker, engine=engine, sequential=sequential, chunk=chunk, p_alive=p_alive, alpha=alpha)  # type: ignore[arg-type]
        probs = load_task(task, problems, seed=seed, on_error=on_error)  # type: ignore[arg-type]
        from analyses.core.planner import tokens_bound

        cfg = planned(cfg, model, device, dtype, seq_len=tokens_bound(*(p.question for p in probs), model=model), prompt_bound=True)
        probe = load_probe(model, backend, device, dtype)
        with progress_bar() as bar:
            res = C.run(probe, probs, config=cfg, progress=bar)
        if adapters is not None:
            import pandas as pd

            ce_rows, stats = [], []
            for i, row in res.traces.iterrows():
                ce = C.contrastive_scores(probe, adapters, res.ids["prompt"][i], res.ids["response"][i])
                ce_rows.append(ce.assign(trace=row.trace))
                stats.append(C.compare_contrastive(res, ce, int(row.trace)))
            ce_all = pd.concat(ce_rows, ignore_index=True)
            tokens = res.tokens.merge(ce_all[["trace", "pos", "p_ce", "weight", "log_ratio"]], on=["trace", "pos"], how="left")
            traces = res.traces.assign(ce_spearman=[s["spearman"] for s in stats], ce_precision_at_k=[s["precision_at_k"] for s in stats])
            res = replace(res, tokens=tokens, traces=traces)
        path = save_result(res, out)
        summary = {"traces": len(res.traces)}
        for _, r in res.traces.iterrows():
            if r.critical_pos == r.critical_pos and r.critical_pos is not None:
                summary[f"trace {r.trace}"] = (
                    f"{r.decision}: candidate {r.critical_token!r} at {r.critical_pos}, success "
                    f"{r.score_before:.2f} [{r.ci_before_lo:.2f}, {r.ci_before_hi:.2f}] ({r.n_before} rollouts) -> "
                    f"{r.score_after:.2f} [{r.ci_after_lo:.2f}, {r.ci_after_hi:.2f}] ({r.n_after}), "
                    f"{1 - cfg.alpha:.0%} Clopper-Pearson; alternatives {r.alt_success}")
            else:
                summary[f"trace {r.trace}"] = r.note
        for w in res.warnings():
            typer.echo(f"warning: {w}", err=True)
        saved(path, as_json, summary)

    @run_app.command("cdpo")
    @model_options
    def cdpo(
        model: str = ModelOpt,
        task: str = TaskOpt,
        problems: int = typer.Option(8, "--problems", "-n"),
        samples: int = typer.Option(16, "--samples", help="Trajectories sampled per problem (pairs need a correct and a wrong one)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        temperature: float = typer.Option(0.7, "--temperature"),
        adapters: Optional[Path] = typer.Option(None, "--adapters", callback=adapters_folder, help="θ_p/θ_n folder from `contrastive-train` for the token weights "
                                                "1 − p_ce; without it they are trained first into OUT/ce (method-page selection)."),
        r: int = typer.Option(16, "--r", help="LoRA rank of the policy (method page: 16, alpha 32)."),
        lr: float = typer.Option(4e-5, "--lr", help="Method page 4e-5; tiny CPU runs need ~1e-3 to move in a few steps."),
        epochs: int = typer.Option(3, "--epochs"),
        beta: float = typer.Option(0.1, "--beta", help="DPO β (method page 0.1)."),
        form: str = typer.Option("sequence", "--form", help="sequence (the paper's objective) or positionwise (the released trainer)."),
        seed: int = typer.Option(0, "--seed"),
        on_error: str = typer.Option("stop", "--on-error"),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Path = typer.Option(..., "--out", "-o", help="New folder for the policy adapter (safetensors + JSON)."),
        as_json: bool = JsonOpt,
    ) -> None:
        """cDPO (Lin et al.): token-weighted DPO of a LoRA policy on (correct, wrong) pairs, rejected tokens weighted by 1 − p_ce."""
        from analyses import critical as C
        from analyses.tasks import format_prompt, load_task
        from probes import InputError

        tcfg = C.CDPOConfig(r=r, alpha=2 * r, lr=lr, epochs=epochs, beta=beta, form=form, seed=seed)  # type: ignore[arg-type]
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{str(out)!r} exists and is not empty.", hint="Pass a new --out folder.")
        cfg = C.Config(n_samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        probs = load_task(task, problems, seed=seed, on_error=on_error)  # type: ignore[arg-type]
        probe = load_probe(model, backend, device, dtype)
        trajs = C.sample_trajectories(probe, probs, cfg)
        prompts = {i: probe.to_tokens(format_prompt(probe, p))[0].tolist() for i, p in enumerate(probs)}
        pairs = C.select_pairs(trajs)
        if not pairs:
            raise InputError(f"no problem among {len(probs)} has both a correct and a wrong sampled answer ({len(trajs)} samples).",
                             hint="Sample more (--samples), raise --temperature, or use problems the model sometimes solves.")
        ce_dir = adapters
        if ce_dir is None:
            pos, neg = C.select_sft(trajs)
            ce_dir = out / "ce"
            with progress_bar() as bar:
                C.train_contrastive(probe, [(prompts[t.problem], t.response_ids) for t in pos],
                                    [(prompts[t.problem], t.response_ids) for t in neg], ce_dir, C.TrainConfig(seed=seed), progress=bar)
        data = []
        for ch, rj in pairs:
            w = C.contrastive_scores(probe, ce_dir, prompts[rj.problem], rj.response_ids).weight.tolist()
            data.append(dict(prompt_ids=prompts[ch.problem], chosen_ids=ch.response_ids, rejected_ids=rj.response_ids, weights=w))
        with progress_bar() as bar:
            res = C.train_cdpo(probe, data, out / "policy", tcfg, progress=bar)
        loss = res["losses"]
        saved(res["path"], as_json, {"pairs": res["n_pairs"], "steps": res["steps"],
                                     "loss_first": round(loss[0], 4), "loss_last": round(loss[-1], 4)})

    @run_app.command("contrastive-train")
    @model_options
    def contrastive_train(
        model: str = ModelOpt,
        task: str = TaskOpt,
        problems: int = typer.Option(8, "--problems", "-n"),
        samples: int = typer.Option(16, "--samples", help="Trajectories sampled per problem."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
        temperature: float = typer.Option(0.7, "--temperature"),
        r: int = typer.Option(8, "--r", help="LoRA rank (method page: 8)."),
        lr: float = typer.Option(3e-4, "--lr"),
        epochs: int = typer.Option(1, "--epochs"),
        seed: int = typer.Option(0, "--seed"),
        on_error: str = typer.Option("stop", "--on-error"),
        backend: str = BackendOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the adapters (OUT/pos, OUT/neg)."),
        as_json: bool = JsonOpt,
    ) -> None:
        """Sample trajectories and LoRA-train θ_p / θ_n for CE scores (method page: θ_p on one response of each problem's most
        frequent correct answer, θ_n on the responses of its most frequent wrong answers covering half of its wrong samples)."""
        from analyses import critical as C
        from analyses.tasks import format_prompt, load_task

        cfg = C.Config(n_samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        tcfg = C.TrainConfig(r=r, lr=lr, epochs=epochs, seed=seed)
        probs = load_task(task, problems, seed=seed, on_error=on_error)  # type: ignore[arg-type]
        probe = load_probe(model, backend, device, dtype)
        with progress_bar() as bar:
            trajs = C.sample_trajectories(probe, probs, cfg, progress=bar)
            prompts = {i: probe.to_tokens(format_prompt(probe, p))[0].tolist() for i, p in enumerate(probs)}
            pos, neg = C.select_sft(trajs)
            good = [(prompts[t.problem], t.response_ids) for t in pos]
            bad = [(prompts[t.problem], t.response_ids) for t in neg]
            path = C.train_contrastive(probe, good, bad, out, tcfg, progress=bar)
        saved(path, as_json, {"correct": len(good), "incorrect": len(bad)})
