"""Pictures for docs/results.md: the Table-3 plot and a Figure-2-like gallery of ranked lists.

`plot_subset_sweep` draws R@1 against the training-subset size; `ranked_lists_png` and
`ranked_lists_html` show, for chosen queries, the caption and the top-10 gallery images (the
true one framed in green), before and after post-processing for queries it changed. Both
pictures come from the same `QueryPanel` list, so the PNG and the HTML always agree.
matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never look for a display
import matplotlib.pyplot as plt
from PIL import Image, ImageOps

from tpas.io import atomic_path, write_text

TRUE_COLOUR = (30, 170, 60)  # green frame: the query's true image
OTHER_COLOUR = (200, 200, 200)  # grey frame: any other gallery image
THUMB_SIZE = (48, 96)  # (width, height): pedestrian crops are 1:2


@dataclass
class RankedRow:
    """One ranked list: a label ("before", "after", "top-10") and the gallery names, best first."""

    label: str
    images: list[str]


@dataclass
class QueryPanel:
    """One query of the figure: its caption, true image, a note, and one or two ranked rows."""

    query_index: str
    caption: str
    gt_image: str | None
    note: str
    rows: list[RankedRow] = field(default_factory=list)


def _thumb(path: str | Path, framed: bool, border: int = 3) -> Image.Image:
    with Image.open(path) as image:
        small = ImageOps.fit(image.convert("RGB"), THUMB_SIZE)
    return ImageOps.expand(small, border=border, fill=TRUE_COLOUR if framed else OTHER_COLOUR)


def _strip(
    paths: dict[str, str], images: list[str], gt: str | None, show_gt: bool, gap: int = 4, gt_gap: int = 24
) -> Image.Image:
    """The ranked thumbnails side by side; with `show_gt`, the true image after a wider gap."""
    thumbs = [_thumb(paths[name], name == gt) for name in images]
    extra = _thumb(paths[gt], True) if show_gt and gt is not None and gt in paths else None
    width = sum(t.width for t in thumbs) + gap * max(0, len(thumbs) - 1) + (gt_gap + extra.width if extra else 0)
    height = max([t.height for t in thumbs] + ([extra.height] if extra else []) + [1])
    strip = Image.new("RGB", (max(width, 1), height), "white")
    x = 0
    for t in thumbs:
        strip.paste(t, (x, 0))
        x += t.width + gap
    if extra is not None:
        strip.paste(extra, (width - extra.width, 0))
    return strip


def _wrap(text: str, width: int, lines: int) -> str:
    wrapped = textwrap.wrap(text, width) or [""]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], textwrap.shorten(" ".join(wrapped[lines - 1 :]), width, placeholder=" ...")]
    return "\n".join(wrapped)


def ranked_lists_png(path: str | Path, panels: list[QueryPanel], gallery_paths: dict[str, str], title: str) -> None:
    """One row per ranked list, the query's caption above its first row, the true image at the right
    end of the first row (framed green); written atomically as a 256-colour PNG to keep it small."""
    rows = [(p, r, i == 0) for p in panels for i, r in enumerate(p.rows)]
    if not rows:
        raise ValueError("no ranked rows to draw")
    strips = [_strip(gallery_paths, r.images, p.gt_image, first) for p, r, first in rows]
    label_px, dpi = 70, 100
    width_px = max(s.width for s in strips) + label_px + 10
    chars = max(40, int((width_px - label_px) / 5.2))  # about 5 px per character at 7.5 pt
    captions = [_wrap(f"{p.note}: \u201c{p.caption}\u201d", chars, 2) if first else "" for p, _, first in rows]
    heights = [
        s.height + (8 + 12 * (c.count("\n") + 1) if first else 6) for s, c, (_, _, first) in zip(strips, captions, rows)
    ]
    head = _wrap(title, int(width_px / 6.5), 3)
    head_px = 14 * (head.count("\n") + 1) + 8
    total = sum(heights) + head_px + 16  # room for the last row's "true" label
    fig = plt.figure(figsize=(width_px / dpi, total / dpi), dpi=dpi)
    fig.text(0.5, 1 - 4 / total, head, ha="center", va="top", fontsize=9)
    top = total - head_px
    for strip, caption, (_panel, row, first), h in zip(strips, captions, rows, heights):
        top -= h
        ax = fig.add_axes((label_px / width_px, top / total, strip.width / width_px, strip.height / total))
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        ax.text(-8, strip.height / 2, row.label, ha="right", va="center", fontsize=8)
        if first:
            ax.text(0, -6, caption, ha="left", va="bottom", fontsize=7.5)
            ax.text(
                strip.width - THUMB_SIZE[0] / 2 - 3,
                strip.height + 3,
                "true",
                ha="center",
                va="top",
                fontsize=7,
                color="#1eaa3c",
            )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)


def _data_uri(path: str | Path) -> str:
    with Image.open(path) as image:
        small = ImageOps.fit(image.convert("RGB"), THUMB_SIZE)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def ranked_lists_html(
    path: str | Path, panels: list[QueryPanel], gallery_paths: dict[str, str], title: str, intro: str = ""
) -> None:
    """A static page with the same panels; thumbnails are small JPEGs embedded as data URIs."""
    uris: dict[str, str] = {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        (
            "<style>body{font-family:sans-serif;max-width:980px;margin:1em auto}"
            "img{margin:2px;border:3px solid #c8c8c8}img.gt{border-color:#1eaa3c}"
            "td.label{padding-right:8px;font-size:90%;color:#555}h3{font-size:100%;margin:1.2em 0 .3em}"
            "span.true{margin-left:20px;font-size:80%;color:#1eaa3c}</style>"
        ),
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for panel in panels:
        parts.append(f"<h3>{html.escape(panel.note)} &mdash; query {html.escape(panel.query_index)}</h3>")
        parts.append(f"<p>&ldquo;{html.escape(panel.caption)}&rdquo;</p><table>")
        for i, row in enumerate(panel.rows):
            cells = []
            for rank, name in enumerate(row.images, start=1):
                if name not in uris:
                    uris[name] = _data_uri(gallery_paths[name])
                cls = ' class="gt"' if name == panel.gt_image else ""
                alt = html.escape(f"rank {rank}: {name}" + (" (true image)" if name == panel.gt_image else ""))
                cells.append(
                    f'<img{cls} src="{uris[name]}" alt="{alt}" title="{alt}" '
                    f'width="{THUMB_SIZE[0]}" height="{THUMB_SIZE[1]}">'
                )
            if i == 0 and panel.gt_image in gallery_paths:
                if panel.gt_image not in uris:
                    uris[panel.gt_image] = _data_uri(gallery_paths[panel.gt_image])
                cells.append(
                    f'<span class="true">true image: <img class="gt" src="{uris[panel.gt_image]}" '
                    f'alt="true image {html.escape(panel.gt_image)}" width="{THUMB_SIZE[0]}" '
                    f'height="{THUMB_SIZE[1]}"></span>'
                )
            parts.append(f'<tr><td class="label">{html.escape(row.label)}</td><td>{"".join(cells)}</td></tr>')
        parts.append("</table>")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts) + "\n")


def plot_subset_sweep(
    path: str | Path,
    sizes: list[int],
    series: dict[str, list[float]],
    title: str,
    xlabel: str = "training pairs in the subset (log scale)",
) -> None:
    """Line plot of each metric series against the subset size; written atomically as PNG."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=100)
    for name, values in series.items():
        ax.plot(sizes, values, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:,}" for s in sizes], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
