"""mkdocs hooks (mkdocs.yml ``hooks:``): the site shows the repository's markdown as GitHub does.

The README is the home page, and a link in any page resolves as it does in the repository: a
page's links are relative to the file's place in the checkout (``docs/results.md`` from the
README, ``../experiments/fashion_mnist/README.md`` from docs/results.md). A repository file
outside ``docs/`` that a page links to becomes part of the site under ``repo/``: a markdown
file as a page (its own links followed; the nav may leave it out), any other file as it is. A
link to a folder goes to its README.md, as on GitHub. A link to nothing is left alone, so
``mkdocs build --strict`` fails on it.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mkdocs.structure.files import File, Files, InclusionLevel

HOME = "README.md"
REPO_PREFIX = "repo/"
# An inline link or image target: ](target) or ](target "title")
_LINK = re.compile(r'(?<!\\)\]\((?P<target>[^)\s]+)(?P<title>\s+"[^"]*")?\)')
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _repo_path(file: File, root: Path) -> str | None:
    """Where a site file lives in the checkout (None: generated from nothing there)."""
    if not file.abs_src_path:
        return None
    try:
        return Path(file.abs_src_path).resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def _site_uris(files: Files, root: Path) -> dict[str, str]:
    """Checkout path → site path of every file of the site."""
    return {path: f.src_uri for f in files if (path := _repo_path(f, root)) is not None}


def _resolve(page: str, target: str, root: Path) -> str | None:
    """The checkout path a relative link of ``page`` names, or None: not a relative link to a
    file or folder of the checkout (external, absolute, a same-page anchor, or missing)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(parts.path)))
    if path == ".." or path.startswith("../"):
        return None
    if (root / path).is_dir() and (root / path / "README.md").is_file():
        path = posixpath.join(path, "README.md")
    return path if (root / path).is_file() else None


def _outside_fences(markdown: str):
    """(line, True when outside fenced code) for each line, ends kept."""
    fenced = False
    for line in markdown.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
            yield line, False
        else:
            yield line, not fenced


def on_files(files: Files, config) -> Files:
    root = _root(config)
    if files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", abs_src_path=str(root / HOME)))
    where = _site_uris(files, root)
    queue = [f for f in files.documentation_pages() if _repo_path(f, root)]
    while queue:
        page = _repo_path(queue.pop(), root)
        for line, prose in _outside_fences((root / page).read_text(encoding="utf-8")):
            for match in _LINK.finditer(line) if prose else ():
                path = _resolve(page, match["target"], root)
                if path is None or path in where:
                    continue  # not a file of the checkout (mkdocs reports it), or in the site
                new = File.generated(config, REPO_PREFIX + path, abs_src_path=str(root / path),
                                     inclusion=InclusionLevel.NOT_IN_NAV)
                files.append(new)
                where[path] = new.src_uri
                if new.is_documentation_page():
                    queue.append(new)
    return files


def _table_row(line: str) -> str:
    """GitHub needs ``\\|`` for a pipe inside a code span in a table; Python-Markdown keeps the
    backslash there but splits no cell at a code span's pipe: unescape them."""
    return _CODE_SPAN.sub(lambda m: m[0].replace("\\|", "|"), line)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = _root(config)
    here = page.file.src_uri
    repo_page = _repo_path(page.file, root)
    if repo_page is None:
        return markdown
    where = _site_uris(files, root)

    def relink(match: re.Match) -> str:
        path = _resolve(repo_page, match["target"], root)
        if path not in where:
            return match[0]  # mkdocs checks it (and fails --strict if it names nothing)
        anchor = urlsplit(match["target"]).fragment
        url = posixpath.relpath(where[path], posixpath.dirname(here) or ".")
        return f"]({url}{'#' + anchor if anchor else ''}{match['title'] or ''})"

    out = []
    for line, prose in _outside_fences(markdown):
        if prose:
            line = _LINK.sub(relink, line)
            if line.lstrip().startswith("|"):
                line = _table_row(line)
        out.append(line)
    return "".join(out)
