"""The README is assembled from docs/readme/*.md and starts with the two set-up commands."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from docs_numbers import builder

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_assembled_from_sections():
    for path, text in builder().outputs().items():
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

    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs" / "readme").glob("*.md"))]}
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


def test_readme_is_short_and_has_no_leftovers():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:40])
    assert len(text.splitlines()) < 250, "the README is read in five minutes: the manual lives in docs/readme/"
    assert ".venv/bin/sonde" in head and "source .venv/bin/activate" in head
    assert "Q4_1" in head and "bf16" in head, "the README says what the embedded model is"
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
    head, body = _latest(lambda h, b: "dashboard start-up" in h and "shared" not in h)  # quoted: a row on idle cores
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


def test_gallery_commands_are_their_pages_first_commands():
    """Each README gallery command is written on its analysis's manual page too, before any other `sonde` line of its
    verb there (the page and the README show the same first command)."""
    nums = builder().numbers()
    assert {e.section for e in nums.GALLERY} >= {"logit_lens", "routes", "sinks", "bigram", "fiber", "critical",
                                                   "counterfactual"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for ex in nums.GALLERY:
        page = (ROOT / "docs" / "readme" / f"{ex.section}.md").read_text(encoding="utf-8")
        same_verb = [shlex.split(c, comments=True) for c in _sonde_lines(page) if c.split()[:3] == ex.command.split()[:3]]
        assert same_verb and same_verb[0] == shlex.split(ex.command), (ex.section, ex.command, same_verb[:1])
        assert ex.line() in readme


def test_manual_links_resolve_on_github():
    """docs/readme/*.md are shown by GitHub as they are: every relative link and picture exists from the page's folder."""
    bad = []
    for page in sorted((ROOT / "docs" / "readme").glob("*.md")):
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:|#", target):
                continue
            base = ROOT if page.stem in ("intro", "docs", "dashboard_intro") else page.parent
            if not (base / target.split("#")[0]).exists():
                bad.append(f"{page.name}: {target}")
    assert not bad, bad


def test_site_builds_strict_and_offline(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): a broken link, a missing page or any warning fails it. The
    built site fetches nothing from the network (no Google fonts, no CDN scripts)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    mkdocs = Path(sys.executable).with_name("mkdocs")
    out = subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site"), "-f", str(ROOT / "mkdocs.yml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    site = tmp_path / "site"
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    for want in ("index.html", "readme/routes.html", "benchmarks.html", "notebooks/00_quickstart.html", "api/probes.html"):
        assert want in pages, want
    assert "probes.reducers.Mean" in (site / "api" / "probes.html").read_text(encoding="utf-8")
    fetched = set()
    for p in site.rglob("*"):
        if p.suffix in (".html", ".css", ".js"):
            t = p.read_text(encoding="utf-8", errors="replace")
            fetched |= set(re.findall(r"(?:src=|@import\s+url\(|<link[^>]*href=)[\"']?(https?://[^\"' )>]+)", t))
    assert not fetched, sorted(fetched)[:5]
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="readme/routes.html"' in home and 'src="img/routes.png"' in home


def test_notebooks_export_their_figures_and_show_no_progress_warning():
    """Every notebook's first cell picks a plotly renderer that embeds the figure, so figures survive
    `jupyter nbconvert --to html` (and show on GitHub). Executed for real: the quickstart's first cell (which loads the
    embedded model) plus a figure, then exported to HTML. With ipywidgets installed (the test and notebooks extras)
    the model load's progress bars draw as widgets, so no "IProgress not found" warning appears."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert 'pio.renderers.default = "plotly_mimetype+notebook"' in first.source, path.name
    nb = nbformat.read(ROOT / "notebooks" / "00_quickstart.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    run = nbformat.v4.new_notebook(cells=[first, nbformat.v4.new_code_cell(
        "import plotly.graph_objects as go\ngo.Figure(go.Bar(x=['sonde-export-check'], y=[1]))")], metadata=nb.metadata)
    NotebookClient(run, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    said = " ".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                    for c in run.cells for o in c.get("outputs", []))
    assert "IProgress" not in said, said[:500]
    html, _ = HTMLExporter().from_notebook_node(run)
    assert "sonde-export-check" in html and "Plotly.newPlot" in html
    assert "not able to be represented" not in html


def _checker():
    import sys

    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "benchmarks" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["readme_commands"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_readme_command_checker_reads_the_gallery_and_compares_figures():
    """benchmarks/readme_commands.py finds every gallery command with the figures quoted beside it, and its comparison
    fails on a figure that differs (text exactly; a number beyond the declared tolerance or two units of the last
    digit shown)."""
    chk, nums = _checker(), builder().numbers()
    cmds = chk.gallery((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [c.line for c in cmds] == [ex.command for ex in nums.GALLERY]
    for c, ex in zip(cmds, nums.GALLERY):
        assert c.prints == list(ex.prints) and c.long == bool(ex.long), c.line
    out = "tokens: 10\nnext_token:  Paris\np_next: 0.7016\nroute_nodes: 195\n"
    assert chk.check_output(out, ["next_token:  Paris", "p_next: 0.7015", "route_nodes: 195"]) == []
    assert chk.check_output(out, ["p_next: 0.7012"]) == ["'p_next: 0.7012' (got '0.7016')"]
    assert chk.check_output(out, ["p_next: 0.70"], tol=0.002) == []
    assert chk.check_output(out, ["next_token:  Rome", "route_edges: 233"]) == [
        "'next_token:  Rome' (got 'Paris')", "'route_edges: 233' (no such line)"]
    assert chk.check_output(out, ["route_nodes: 196"]) != []
