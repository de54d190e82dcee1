"""MkDocs hooks of the documentation site (``mkdocs.yml`` names this file).

The manual's pages are docs/readme/*.md, written with links relative to their own folder so that GitHub shows them
too; here each page gets its title as the top-level heading and links into the repository re-pointed at the site.
The hooks add the pages that have no file under docs/: the home page (README.md), the benchmark figures
(benchmarks/RESULTS.md), the API reference (mkdocstrings) and the notebooks (rendered by mkdocs-jupyter, not run).
All of it comes from docs/build_readme.py, the one generator of the docs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    if str(ROOT / "docs") not in sys.path:
        sys.path.insert(0, str(ROOT / "docs"))
    import build_readme

    return build_readme


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files, config):
    for uri, content in _builder().site_pages().items():
        files.append(File.generated(config, uri, content=content))
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(File(f"notebooks/{nb.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri
    if uri.startswith("readme/") and uri.endswith(".md"):
        return _builder().site_page(Path(uri).stem)
    return markdown
