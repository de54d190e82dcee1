"""Every verb that saves a result takes ``--html``: a one-file report (figure, tables, manifest) that opens offline.
A report that cannot be written stops the run before anything is saved."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("verb", [
    ["run", "sinks", "--domain", "arithmetic", "--n-samples", "2", "--T", "8", "--no-ablation"],
    ["run", "fiber", "--tokens", "0:20"],
    ["run", "routes", "--prompt", "The capital of France is"],
], ids=lambda v: v[1])
def test_every_verb_writes_an_offline_html_report(verb, results_dir, tmp_path, capsys):
    page = tmp_path / "report" / "r.html"
    code, out, err = run_cli([*verb, "--device", "cpu", "--out", str(results_dir / verb[1]), "--html", str(page)], capsys)
    assert code == 0, err
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "Manifest" in text and 'src="https://cdn.plot.ly' not in text
    assert "Plotly.newPlot" in text or "plotly" in text.lower()  # the figure, with plotly.js inlined
    assert (results_dir / verb[1] / "manifest.json").is_file()


def test_a_report_that_cannot_be_written_saves_nothing(results_dir, tmp_path, capsys):
    """Refused before the model loads (its folder is a file); a late failure is save_result's (test_user_files)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    code, _, err = run_cli(["run", "sinks", "--domain", "arithmetic", "--n-samples", "2", "--T", "8", "--no-ablation",
                            "--device", "cpu", "--out", str(results_dir / "f"), "--html", str(blocker / "r.html")], capsys)
    assert code == 2 and err.strip().startswith("error:") and "r.html" in err and len(err.strip().splitlines()) == 1
    assert not (results_dir / "f").exists() and blocker.read_text() == "mine"
