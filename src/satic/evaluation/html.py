"""A static HTML page of predicted captions next to their images, for looking at results by eye.

Image links are relative to the page, so the page and the images can be moved or served together;
all text is escaped, so a caption can never inject markup.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

from satic.io import atomic_path

STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { width: 320px; margin: 0; padding: 0.6em; background: white; border: 1px solid #ddd; }
figure img { width: 100%; height: auto; display: block; }
.caption { margin: 0.4em 0; }
.caption .who { display: block; }
.caption .text { font-weight: bold; }
figcaption .who { color: #666; font-size: 0.85em; }
.references { color: #555; font-size: 0.9em; padding-left: 1.2em; margin: 0.2em 0; }
.scores { color: #777; font-size: 0.8em; }
.image-id { color: #999; font-size: 0.8em; }
"""


@dataclass(frozen=True)
class PageItem:
    image_id: int | str
    captions: Mapping[str, str]  # who wrote it -> caption, e.g. {"prediction": ...} or one entry per model
    image_path: str | os.PathLike | None = None  # image file; None shows the caption alone
    references: Sequence[str] = ()
    scores: Mapping[str, float] = field(default_factory=dict)  # e.g. {"CIDEr": 1.2}


def image_url(image_path: str | os.PathLike, page_dir: Path) -> str:
    """Relative, percent-encoded URL of an image as seen from the page's folder: the bytes of its path, so that a
    name that is not UTF-8 (a folder named in another encoding) links to its file too."""
    relative = os.path.relpath(Path(image_path).resolve(), page_dir.resolve())
    return quote(os.fsencode(Path(relative).as_posix()))


def render_item(item: PageItem, page_dir: Path, lazy: bool = True) -> str:
    e = html.escape
    parts = [f'<figure data-image-id="{e(str(item.image_id))}">']
    if item.image_path is not None:
        parts.append(f'<img src="{e(image_url(item.image_path, page_dir))}" alt="image {e(str(item.image_id))}"'
                     + (' loading="lazy">' if lazy else ">"))
    parts.append("<figcaption>")
    parts += [f'<div class="caption" data-who="{e(who)}"><span class="who">{e(who)}</span>'
              f'<span class="text">{e(caption)}</span></div>' for who, caption in item.captions.items()]
    if item.references:
        items = "".join(f"<li>{e(r)}</li>" for r in item.references)
        parts.append(f'<div class="who">references</div><ol class="references">{items}</ol>')
    if item.scores:
        parts.append('<div class="scores">' + ", ".join(f"{e(k)} {v:.3f}" for k, v in item.scores.items()) + "</div>")
    parts.append(f'<div class="image-id">image {e(str(item.image_id))}</div></figcaption></figure>')
    return "".join(parts)


def write_html_page(path: str | os.PathLike, items: Sequence[PageItem], title: str = "satic predictions",
                    notes: Sequence[str] = (), lazy: bool = True) -> Path:
    """Write the page atomically; image paths are linked relative to the page's folder. `notes` are
    paragraphs under the title; lazy=True loads each image only when it scrolls into view (for pages
    of thousands of images)."""
    path = Path(path)
    page_dir = path.parent
    body = "\n".join(render_item(item, page_dir, lazy) for item in items)
    paragraphs = "".join(f"<p>{html.escape(note)}</p>" for note in (*notes, f"{len(items)} images"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>"
            f'{paragraphs}\n<div class="grid">\n{body}\n</div></body></html>\n')
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
