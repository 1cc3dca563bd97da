"""An HTML gallery of processed photos, one page a person can open: ``write_gallery(path, documents, errors)``.

Each photo shows its smallest rendition, linking to its largest, with what
its metadata says (camera, time taken, place, size, tags). Renditions in a
local store are linked by paths relative to the page, so the directory can
be moved or served as it is; others by their URL. Records that failed are
listed with their errors. Everything written is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["write_gallery"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; background: #fafafa; }}
h1 {{ font-weight: 600; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border-radius: 6px; box-shadow: 0 1px 3px #0002; overflow: hidden; }}
figure img {{ width: 100%; height: 180px; object-fit: cover; display: block; }}
figcaption {{ padding: .5rem .75rem; font-size: 13px; }}
figcaption b {{ display: block; font-size: 14px; }}
.tags span {{ background: #eef; border-radius: 3px; padding: 0 .3rem; margin-right: .2rem; }}
.errors {{ margin-top: 2rem; color: #a00; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<div class="grid">
{figures}
</div>
{errors}
</body></html>
"""


def _link(url: str, page_dir: Path) -> str:
    """A rendition's URL as the page should link it: relative for a file next to the page."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(os.path.relpath(unquote(parsed.path), page_dir)).as_posix()
    return url


def _figure(document: dict, page_dir: Path) -> str:
    outputs = sorted(document.get("outputs") or [], key=lambda o: o.get("width") or 0)
    if not outputs:
        return ""
    small, large = _link(outputs[0]["url"], page_dir), _link(outputs[-1]["url"], page_dir)
    name = Path(urlparse(str(document.get("source") or "")).path).name or document.get("sha256", "?")[:12]
    camera = " ".join(x for x in (document.get("make"), document.get("model")) if x)
    gps = document.get("gps") or {}
    where = f"{gps['lat']:.4f}, {gps['lon']:.4f}" if gps.get("lat") is not None else ""
    lines = [
        f"<b>{html.escape(name)}</b>",
        html.escape(f"{document.get('width')}×{document.get('height')} {document.get('format') or ''}"),
        html.escape(camera),
        html.escape(str(document.get("taken") or "")),
        html.escape(where),
    ]
    tags = "".join(f"<span>{html.escape(str(tag))}</span>" for tag in document.get("tags") or [])
    caption = "<br>".join(line for line in lines if line) + (f'<div class="tags">{tags}</div>' if tags else "")
    return (
        f'<figure><a href="{html.escape(large, quote=True)}">'
        f'<img loading="lazy" src="{html.escape(small, quote=True)}" alt="{html.escape(name, quote=True)}"></a>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def write_gallery(
    path: str | Path, documents: Iterable[dict], errors: Iterable[tuple[str, str]] = (), *, title: str = "Photos"
) -> Path:
    """Write the gallery page to ``path``: a figure per metadata document, then each (source, error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    documents, errors = list(documents), list(errors)
    figures = "\n".join(filter(None, (_figure(d, path.parent.resolve()) for d in documents)))
    failed = ""
    if errors:
        items = "".join(f"<li>{html.escape(source)}: {html.escape(error)}</li>" for source, error in errors)
        failed = f'<div class="errors"><h2>Not processed</h2><ul>{items}</ul></div>'
    summary = f"{len(documents)} photos" + (f", {len(errors)} not processed" if errors else "")
    path.write_text(
        PAGE.format(title=html.escape(title), summary=summary, figures=figures, errors=failed), encoding="utf-8"
    )
    return path
