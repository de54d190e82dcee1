"""The README is assembled from docs/readme/*.md and starts with the two set-up commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", ROOT / "docs" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_assembled_from_sections():
    for path, text in _builder().outputs().items():
        assert path.is_file() and path.read_text(encoding="utf-8") == text, \
            f"{path.relative_to(ROOT)} is out of date: run python docs/build_readme.py"


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:8]
    cmds = [l.split("#")[0].strip() for l in head if l.startswith("make ")]
    assert cmds == ["make dashboard", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and "TORCH_SPEC" in ci


def _sonde_lines(text: str) -> list[str]:
    """The `sonde ...` commands of a markdown text's bash blocks (continuations joined, `[optional]` groups dropped)."""
    lines, block, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = line.strip() == "```bash" if not fenced else False
            continue
        if fenced:
            block.append(line)
    joined = "\n".join(block).replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip()
        for cmd in re.split(r"\s(?:&&|;)\s", line):
            cmd = re.sub(r"^(\.venv/bin/)?(?=sonde )", "", cmd.strip())
            if cmd.startswith("sonde "):
                lines.append(re.sub(r"\s\[[^\]]*\]", "", cmd))
    return lines


def _parse(argv: list[str]):
    """Resolve `sonde ARGS` down to its command with click's parser and parse its arguments (nothing runs)."""
    import typer.main

    from analyses.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("sonde", list(argv), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):
        args = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, args)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return cmd


def test_every_sonde_command_in_the_docs_parses():
    import shlex

    from probes.errors import InputError

    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    seen, bad = 0, []
    for path, text in texts.items():
        for line in _sonde_lines(text):
            seen += 1
            try:
                _parse(shlex.split(line, comments=True)[1:])
            except Exception as e:  # typer vendors click: its exceptions are matched by shape, not class
                if type(e).__name__ == "Exit":  # --help
                    continue
                if isinstance(e, InputError) and "does not exist" in str(e):  # the example's own file (prompts.jsonl)
                    continue
                if not hasattr(e, "format_message"):
                    raise
                bad.append(f"{path.relative_to(ROOT)}: {line}\n    -> {e.format_message()}")
    assert seen >= 20, f"found only {seen} sonde commands in the docs"
    assert not bad, "commands in the docs that the CLI rejects:\n" + "\n".join(bad)


def test_readme_has_contents_and_no_leftovers():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:40])
    assert "## Contents" in text and ".venv/bin/sonde" in head and "source .venv/bin/activate" in head
    for stale in ("<!-- analysis sections -->", "shared/STYLE.md", "as before", "huggingface-cli", "\n#### "):
        assert stale not in text, f"README.md still says {stale!r}"
    for img in re.findall(r"!\[[^\]]*\]\((docs/img/[^)]+)\)", text):
        p = ROOT / img
        assert p.is_file() and p.stat().st_size < 150_000, f"{img} is missing or over 150 KB"


def _results_sections() -> list[tuple[str, str]]:
    """benchmarks/RESULTS.md as (heading, body) pairs in file order (new entries are appended)."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    parts = text.split("\n## ")[1:]
    return [(p.split("\n", 1)[0], p.split("\n", 1)[1] if "\n" in p else "") for p in parts]


def _latest(pred) -> tuple[str, str]:
    found = [s for s in _results_sections() if pred(*s)]
    assert found, "no matching section in benchmarks/RESULTS.md"
    return found[-1]


def _flat(path: str) -> str:
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


def test_readme_quotes_the_latest_dashboard_start_up_row():
    head, body = _latest(lambda h, b: "dashboard start-up" in h)
    date = head.split()[0]
    at_once = float(re.search(r"first chart ([\d.]+) s after start", body).group(1))
    late = float(re.search(r"\| ([\d.]+) s after opening the page", body).group(1))
    text = _flat("docs/readme/dashboard_intro.md")
    assert f"about {round(late)} s ({round(at_once)} s when the browser opens at once; 2 idle CPU cores, {date}," in text


def test_readme_quotes_the_latest_routes_rows():
    head, body = _latest(lambda h, b: "**compiled kernel**" in b and "top-down route" in b)
    date = head.split()[0]
    text = _flat("docs/readme/routes.md")
    assert date in text
    for T in (128, 512):
        def ratio(kind: str) -> str:
            m = re.search(rf"\| `routes.py` \| {kind}[^|]*T={T} \| ([\d.]+×)", body)
            assert m, (kind, T)
            return m.group(1)

        compiled = ratio(re.escape("all-position graph, **compiled kernel**"))
        row = f"| T = {T} | {compiled} | {ratio('all-position graph, eager kernel')} | {ratio('top-down route')} |"
        assert row in text, row


def test_readme_quotes_the_latest_fiber_rows():
    head, body = _latest(lambda h, b: "`fiber.py` | full vocabulary" in b)
    knn, peak = re.search(r"`fiber.py` \| full vocabulary[^|]*\|[^|]*kNN ([\d.]+) s[^|]*peak ([\d.]+ GB)", body).groups()
    blocked, dense = re.search(r"`fiber.py` \| \d+-row subset[^|]*\| ([\d.]+) s blocked vs ([\d.]+) s dense", body).groups()
    text = _flat("docs/readme/fiber.md")
    assert f"Measured** ({head.split()[0]}," in text
    assert f"took {knn} s with a peak RSS of {peak}" in text and f"blocked path took {blocked} s against {dense} s" in text


def test_readme_quotes_the_latest_logit_lens_row():
    head, body = _latest(lambda h, b: "| logit lens (page) |" in b)
    ratio = re.search(r"\| logit lens \(page\) \|[^|]*\| ≈([\d.]+×) forward", body).group(1)
    date = head.split()[0]
    for page, phrase in (("docs/readme/logit_lens.md", f"costs ~{ratio} a plain forward"),
                         ("docs/readme/dashboard.md", f"about {ratio} a plain forward")):
        text = _flat(page)
        assert phrase in text and date in text, (page, phrase, date)


def test_scale_out_page_quotes_the_latest_ray_sweep_rows():
    head, body = _latest(lambda h, b: "dataset sweep on Ray" in h)
    rows = [ln.replace("| scale: ", "| ", 1) for ln in body.splitlines() if ln.startswith("| scale: ")]
    assert len(rows) == 4
    text = _flat("docs/readme/cluster.md")
    assert head.split()[0] in text
    for row in rows:
        assert row in text, row
