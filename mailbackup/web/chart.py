"""The archive over time as server-rendered SVG: messages per month, stacked by folder."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from html import escape

from .viewer import Month

COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 900, 300, 50, 40, 10


def _month_range(first: str, last: str) -> list[str]:
    year, month = int(first[:4]), int(first[5:7])
    out: list[str] = []
    while f"{year:04d}-{month:02d}" <= last and len(out) < 1200:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def months_svg(months: Sequence[Month]) -> str:
    """A stacked bar per month (every month from the first to the last, empty ones too), a legend per folder."""
    valid = [m for m in months if len(m.month) == 7 and m.month[:4].isdigit() and m.month[5:].isdigit()]
    if not valid:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="300" height="30"><text x="0" y="20">no messages</text></svg>'
    axis = _month_range(min(m.month for m in valid), max(m.month for m in valid))
    folders = sorted({m.folder for m in valid})
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(folders)}
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for m in valid:
        counts[m.month][m.folder] = counts[m.month].get(m.folder, 0) + m.messages
    peak = max(sum(c.values()) for c in counts.values())
    legend_rows = (len(folders) + 3) // 4
    height = HEIGHT + legend_rows * 18
    plot_h = HEIGHT - BOTTOM - TOP
    bar = (WIDTH - LEFT - 10) / len(axis)
    out: list[str] = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="messages per month">'
        )
    ]
    out.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 10}" y2="{TOP + plot_h}" stroke="#888"/>')
    for fraction in (0, 0.5, 1):
        y = TOP + plot_h - fraction * plot_h
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{round(peak * fraction)}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    every = max(1, len(axis) // 12)
    for i, month in enumerate(axis):
        x = LEFT + i * bar
        y = TOP + plot_h
        for folder in folders:
            n = counts.get(month, {}).get(folder, 0)
            if not n:
                continue
            h = n / peak * plot_h
            y -= h
            out.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}" '
                       f'fill="{colour[folder]}"><title>{escape(month)} {escape(folder)}: {n}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x + bar / 2:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" font-size="11">{month}</text>')
    for i, folder in enumerate(folders):
        x = LEFT + (i % 4) * 210
        y = HEIGHT + (i // 4) * 18
        total = sum(c.get(folder, 0) for c in counts.values())
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{colour[folder]}"/>')
        out.append(f'<text x="{x + 16}" y="{y}" font-size="12">{escape(folder[:26])} ({total})</text>')
    out.append("</svg>")
    return "".join(out)
