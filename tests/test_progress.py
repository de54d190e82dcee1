"""One progress protocol: every analysis reports :class:`analyses.core.progress.Progress` events, phase by phase,
and every verb that can run long shows each phase on stderr (``--json`` included), from its start to its end."""

from __future__ import annotations

import json
import re

import pytest

from analyses.core.progress import Progress, phase
from conftest import PROGRESS_LINE, run_cli
from probes.errors import ConfigError


def test_a_phase_reports_its_start_every_unit_and_its_end():
    seen: list[Progress] = []
    bar = phase(seen.append, "rollouts", 3, "prefixes")
    bar.advance()
    bar.advance(loss="0.5")
    bar.close()  # two of three planned units were needed: the total becomes 2
    assert [(e.done, e.total) for e in seen] == [(0, 3), (1, 3), (2, 3), (2, 2)]
    assert seen[-1].finished and not seen[1].finished and seen[2].info == {"loss": "0.5"}
    assert str(seen[2]) == "rollouts: 2/3 prefixes (loss 0.5)"
    assert seen[1].fraction == pytest.approx(1 / 3) and Progress("x", 4).fraction is None
    resumed = []
    phase(resumed.append, "shards", 8, "shards", done=5)
    assert resumed == [Progress("shards", 5, 8, "shards")]
    phase(None, "nothing", 2).advance()  # no callback: nothing to do


def test_a_progress_that_is_not_callable_is_one_line_before_the_work():
    with pytest.raises(ConfigError, match="progress must be a callable"):
        phase(42, "kNN", 3)


def test_the_dashboard_job_and_a_notebook_take_the_same_events(tiny):
    from analyses import sinks
    from dashboard.workbench import Cancelled, Job

    probe = tiny("llama")
    events: list[Progress] = []
    sinks.run(probe, domain="random", config=sinks.Config(T=8, n_samples=4, batch_size=2, mlp_ablation=False),
              progress=events.append)
    assert [(e.phase, e.done, e.total) for e in events] == [("measuring", 0, 4), ("measuring", 2, 4), ("measuring", 4, 4)]
    job = Job(label="sinks")
    job.step(events[1])
    assert job.progress == 0.5 and job.last is events[1]
    job.cancel.set()
    with pytest.raises(Cancelled, match="measuring: 2/4 samples"):
        job.step(events[1])


def _phases(err: str) -> dict[str, list[str]]:
    """stderr's progress lines by phase ("<phase>: <done>[/<total>] <unit>, <elapsed> elapsed...")."""
    out: dict[str, list[str]] = {}
    for line in err.splitlines():
        m = PROGRESS_LINE.match(line)
        if m:
            out.setdefault(m.group(1), []).append(line)
    return out


@pytest.fixture
def wrong_task(tmp_path):
    """A GSM8K-style task whose reference answer no sample reaches: every trajectory is wrong, so the search runs."""
    p = tmp_path / "task.jsonl"
    p.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 987654"}) + "\n", encoding="utf-8")
    return p


VERBS = {
    "sinks": (["run", "sinks", "--domain", "arithmetic", "--n-samples", "2", "--T", "8", "--no-ablation"], ["measuring"]),
    "sinks-sweep": (["run", "sinks", "--domain", "arithmetic", "--n-samples", "4", "--T", "8", "--no-ablation", "--engine", "local",
                     "--shard-size", "2"], ["shards"]),
    "dormant": (["run", "dormant", "--domains", "arithmetic", "--n-samples", "2", "--T", "8", "--heads", "L1H2"],
                ["measuring arithmetic", "causal check"]),
    "bb-toy": (["run", "bb-toy", "--steps", "3"], ["training"]),
    "fiber": (["run", "fiber", "--tokens", "0:20"], ["kNN"]),
    "bigram": (["run", "bigram", "--schedule", "short", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--layers", "0",
                "--drop-other-layers", "--eval-rows", "2"], ["tokenizing", "counting bigrams", "training", "evaluating"]),
    "critical": (["run", "critical", "--task", "{task}", "--problems", "1", "--samples", "2", "--rollouts", "1",
                  "--max-new-tokens", "6", "--granularity", "bisect", "--alternatives", "none"], ["sampling", "trace 1/1: rollouts"]),
    "bias-sweep": (["run", "bias-sweep", "--samples", "2", "--max-new-tokens", "3"], ["generating"]),
}


@pytest.mark.parametrize("name", list(VERBS))
def test_every_long_verb_shows_each_phase_from_start_to_end(name, results_dir, wrong_task, capsys):
    args, phases = VERBS[name]
    args = [a.replace("{task}", str(wrong_task)) for a in args]
    code, out, err = run_cli([*args, "--out", str(results_dir / f"progress-{name}"), "--json"], capsys)
    assert code == 0, err
    json.loads(out)  # stdout stays clean for --json: the bars are on stderr
    seen = _phases(err)
    for p in phases:
        lines = seen.get(p)
        assert lines, f"no progress line for phase {p!r}:\n{err}"
        first, last = lines[0], lines[-1]
        assert re.match(rf"^{re.escape(p)}: 0\b", first), first  # shown when it starts
        m = re.match(r"^.+?: (\d+)/(\d+)", last)
        assert m and m.group(1) == m.group(2), last  # and when it ends, at its total


def test_capture_shows_its_loop(tmp_path, capsys):
    code, _, err = run_cli(["capture", "--prompt", "Hello there", "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "c.safetensors")],
                           capsys)
    assert code == 0, err
    assert _phases(err).get("capturing") and "capturing: 1/1 texts" in err


def test_contrastive_training_reports_both_adapters(tiny, tmp_path):
    from analyses import cdpo

    probe = tiny("llama")
    events: list[Progress] = []
    pair = ([1, 2, 3], [4, 5])
    cdpo.train_contrastive(probe, [pair], [pair, pair], tmp_path / "ad",
                           cdpo.TrainConfig(r=2, target_modules=("q_proj",)), progress=events.append)
    ends = {e.phase: (e.done, e.total) for e in events}
    assert ends == {"training pos": (1, 1), "training neg": (2, 2)}
