"""`sonde plan`, and the plans of fiber, bigram and bigram-eval before their weights load: under
$SONDE_MEMORY_LIMIT a run lowers its kNN block / micro-batch / evaluation batch with one `planner:` line, or stops
with exit 2 and one `error:` line (embedded model, real runs)."""

import json

from analyses.core import planner
from conftest import run_cli


def _limit(monkeypatch, nbytes: float) -> None:
    monkeypatch.setenv("SONDE_MEMORY_LIMIT", str(int(nbytes)))


def _refused(code, err) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "not starting" in lines[0], err
    return lines[0]


def _planner_line(err) -> str:
    lines = [line for line in err.splitlines() if line.startswith("planner:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bigram_lowers_its_micro_batch_or_refuses_under_the_memory_limit(tmp_path, monkeypatch, capsys):
    from analyses import bigram

    shape = planner.shape_of("embedded")
    cfg = bigram.Config(batch=4, seq_len=16, layers=(0,))  # the sizes the run below plans with

    def need(b: int, t: int = 16) -> int:
        return planner.estimate("bigram", shape, seq_len=t, batch_size=b, config=cfg).total

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    args = ["run", "bigram", "--corpus", str(corpus), "--schedule", "short", "--steps", "1", "--batch-size", "4",
            "--layers", "0", "--no-eval", "--device", "cpu", "--json"]
    _limit(monkeypatch, need(2) / 0.8 + 1)  # two rows per pass fit, three do not
    code, out, err = run_cli(args + ["--seq-len", "16", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "each batch of 4 rows as 2 passes of ≤ 2 rows (--micro-batch 2)" in _planner_line(err)
    assert json.loads(out)["steps"] == 1
    # rows of 64 tokens do not fit even one at a time: refused before loading, naming the rows that do
    line = _refused(*run_cli(args + ["--seq-len", "64", "--out", str(tmp_path / "r2")], capsys)[::2])
    tokens = int(line.split("with rows of ")[1].split()[0])
    assert "--micro-batch 1 with rows of" in line and 16 <= tokens < 64
    assert need(1, tokens) <= 0.8 * (need(2) / 0.8 + 1) < need(1, tokens + 1)
    assert not (tmp_path / "r2").exists()


def test_fiber_lowers_its_knn_block_or_refuses_under_the_memory_limit(tmp_path, monkeypatch, capsys):
    from analyses import fiber

    shape = planner.shape_of("embedded")
    cfg = fiber.Config(tokens=tuple(range(100, 164)), vol_max=100, block_size=8192)

    def need(b: int) -> int:
        return planner.estimate("fiber", shape, seq_len=1, batch_size=b, config=cfg).total

    args = ["run", "fiber", "--tokens", "100:164", "--vol-max", "100", "--block-size", "8192", "--device", "cpu", "--json"]
    _limit(monkeypatch, need(2048) / 0.8 + 1)  # the centring is the peak below ~2,300 rows, the kNN block above
    code, out, err = run_cli(args + ["--out", str(tmp_path / "f")], capsys)
    assert code == 0, err
    line = _planner_line(err)
    rows = int(line.split("passes of ≤ ")[1].split()[0])
    assert "runs --block-size 8192 as" in line and 2048 <= rows < 8192 and need(rows + 1) > 0.8 * (need(2048) / 0.8 + 1)
    assert json.loads(out)["result"]
    _limit(monkeypatch, need(1) * 0.9)  # not even one row per block
    line = _refused(*run_cli(args + ["--out", str(tmp_path / "f2")], capsys)[::2])
    assert "--block-size 1" in line and "--tokens" in line and not (tmp_path / "f2").exists()


def test_bigram_eval_lowers_its_batch_or_refuses_under_the_memory_limit(tmp_path, monkeypatch, capsys):
    from analyses import bigram

    shape = planner.shape_of("embedded")
    cfg = bigram.default_result().config

    def need(b: int) -> int:
        return planner.estimate("bigram-eval", shape, seq_len=cfg.seq_len, batch_size=b, config=cfg).total

    args = ["run", "bigram-eval", "--mask", "shipped", "--eval-rows", "2", "--device", "cpu", "--json"]
    _limit(monkeypatch, need(2) / 0.8 + 1)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "each batch of 8 rows as 4 passes of ≤ 2 rows (--batch-size 2)" in _planner_line(err)
    assert len(json.loads(out)["ablation"]) >= 5
    _limit(monkeypatch, need(1) * 0.5)
    _refused(*run_cli(args, capsys)[::2])


# ----------------------------------------------------------------------------- sonde plan
def test_plan_reads_the_config_alone_and_shows_each_part(tmp_path, capsys):
    import tiny_models

    folder = tmp_path / "config-only"
    tiny_models.config("llama").save_pretrained(folder)  # config.json and no weights: nothing could load them
    assert not [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    shape = planner.shape_of(str(folder))
    args = ["plan", "bigram", "--model", str(folder), "--batch-size", "8", "--seq-len", "32", "--micro-batch", "8",
            "--device", "cpu"]
    code, out, err = run_cli(args + ["--free", "8GiB", "--json"], capsys)
    assert code == 0, err
    p = json.loads(out)
    from analyses import bigram

    est = planner.estimate("bigram", shape, seq_len=32, batch_size=8, config=bigram.Config(batch=8, seq_len=32))
    assert (p["peak_bytes"], p["weights_bytes"], p["activation_bytes"]) == (est.total, shape.weight_bytes, est.activations)
    assert p["persistent_parts"] == list(est.persistent) and {"saved_activations", "mask_state"} <= set(p["persistent_parts"])
    assert p["setting"] == "--micro-batch 8" and not p["lowered"] and p["fits"] and p["free_bytes"] == 8 * 2**30
    # less memory: the setting the run would choose, lowered
    tight = int(planner.estimate("bigram", shape, seq_len=32, batch_size=3, config=bigram.Config(batch=8, seq_len=32)).total / 0.8) + 1
    code, out, _ = run_cli(args + ["--free", str(tight)], capsys)
    lines = out.splitlines()
    assert code == 0 and "(--micro-batch 3)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["total", "persistent", "transient", "setting", "free"]
    assert "mask_state" in lines[2] and "--micro-batch 3 (lowered to fit)" in lines[4]
    # a config field as the run takes it (--block-size of fiber), and a run that fits nowhere: the refusal, exit 0
    code, out, _ = run_cli(["plan", "fiber", "--model", str(folder), "--block-size", "16", "--device", "cpu", "--json"], capsys)
    assert code == 0 and json.loads(out)["setting"] == "--block-size 16"
    code, out, _ = run_cli(["plan", "sinks", "--model", str(folder), "--T", "64", "--device", "cpu", "--free", "1KiB", "--json"], capsys)
    p = json.loads(out)
    assert code == 0 and not p["fits"] and "not starting" in p["message"]


def test_plan_refuses_unknown_analyses_and_options_in_one_line(capsys):
    code, _, err = run_cli(["plan", "attention"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the planner knows no analysis 'attention'") and "bigram-eval" in err and "fiber" in err
    code, _, err = run_cli(["plan", "sinks", "--nothing", "3", "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: sonde plan sinks: unknown option --nothing") and "--T" in err
    code, _, err = run_cli(["plan", "sinks", "--T", "1", "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
