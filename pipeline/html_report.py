"""A report's markdown as one self-contained HTML page: tables rendered, every local PNG embedded as a data URI.

The page references no local file, so it opens alone in a browser (mailed, attached, or copied anywhere). Rendered
with markdown-it-py (CommonMark plus tables; raw HTML in the markdown is escaped, not passed through).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from urllib.parse import unquote, urlparse

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .25em; }
h2 { margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: left; }
th { background: #f6f8fa; }
td:not(:first-child), th:not(:first-child) { text-align: right; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: .92em; }
"""


def _local_path(ref: str) -> str | None:
    """The local file a link or image reference names (None for web addresses, anchors and data URIs)."""
    url = urlparse(ref)
    if url.scheme in ("http", "https", "data", "mailto") or ref.startswith("#"):
        return None
    if url.scheme not in ("", "file"):  # e.g. "C:" of a Windows path is a scheme to urlparse
        return ref
    return unquote(url.path)


def _data_uri(path: Path, ref: str) -> str:
    if path.suffix.lower() != ".png":
        raise ValueError(f"report image {ref!r}: only PNG files are embedded, not {path.suffix or 'no suffix'}")
    if not path.is_file():
        raise FileNotFoundError(f"report image {ref!r}: {path} does not exist")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """Render `text` (markdown) to a complete HTML page; images with a local `src` (relative to `base`) become
    base64 data URIs, and links to local files keep their text but lose the link (the file is not in the page)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for block in tokens:
        children, drop_close = [], []
        for tok in block.children or []:
            if tok.type == "image" and (ref := _local_path(tok.attrGet("src") or "")) is not None:
                tok.attrSet("src", _data_uri(base / ref, tok.attrGet("src")))
            elif tok.type == "link_open":
                local = _local_path(tok.attrGet("href") or "") is not None
                drop_close.append(local)
                if local:
                    continue
            elif tok.type == "link_close" and drop_close.pop():
                continue
            children.append(tok)
        if block.children is not None:
            block.children = children
    body = md.renderer.render(tokens, md.options, {})
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
