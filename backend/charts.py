"""Small server-rendered SVG charts (no JavaScript charting library to vendor or load)."""

from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup, escape


def _axes(width: int, height: int, pad_l: int, pad_r: int, y0: float, y1: float, sy, x_first: str, x_last: str, x_label: str) -> list[str]:
    """Three horizontal grid lines with their values, the x axis's end values and its name between them."""
    parts = []
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 4}">{x_first}</text><text x="{width - pad_r}" y="{height - 4}" text-anchor="end">{x_last}</text>')
    if x_label:
        parts.append(f'<text x="{(pad_l + width - pad_r) / 2:.0f}" y="{height - 4}" text-anchor="middle" class="axis">{escape(x_label)}</text>')
    return parts


def line_chart(
    xs: Sequence[float], series: dict[str, Sequence[float | None]], width: int = 560, height: int = 200, y_label: str = "",
    x_label: str = "",
) -> Markup:
    """Lines over a shared x axis, each series with its own colour and legend entry; ``x_label`` names the axis
    between its end values.

    ``None`` means "not measured at this x" (the held-out EVR is measured every few logged steps): the
    line joins the measured points on either side. A non-finite value (a diverged loss) breaks it.
    """
    colours = ["#2563eb", "#dc2626", "#059669", "#d97706"]
    pad_l, pad_r, pad_t, pad_b = 48, 10, 10, 34
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not xs or not values:
        return Markup('<p class="muted">No data yet.</p>')
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(values), max(values)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: pad_l + (x - x0) / ((x1 - x0) or 1) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda y: pad_t + (y1 - y) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(y_label)}">',
             *_axes(width, height, pad_l, pad_r, y0, y1, sy, f"{x0:g}", f"{x1:g}", x_label)]
    for i, (name, ys) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        segments, current = [], []
        for x, y in zip(xs, ys):
            if y is None:
                continue
            if not math.isfinite(y):
                if current:
                    segments.append(current)
                current = []
            else:
                current.append(f"{sx(x):.1f},{sy(y):.1f}")
        if current:
            segments.append(current)
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
            else:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{" ".join(seg)}"/>')
        parts.append(f'<text x="{pad_l + 8 + 130 * i}" y="{height - 18}" fill="{colour}">■ {escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(edges: Sequence[float], counts: Sequence[int], below: int = 0, width: int = 560, height: int = 160,
              label: str = "activation histogram", below_label: str | None = None, log: bool = True) -> Markup:
    """Bars over bins (log-spaced unless ``log`` is off). The ``below`` values left of the first edge have no
    bar: where there are any, a line under the axis counts them, ``below_label`` after the count (default:
    "below" and the first edge), and says they are not drawn."""
    if not counts:
        return Markup('<p class="muted">Never fires on the precompute images.</p>')
    pad_l, pad_b, pad_t = 40, 30, 8
    top = max(max(counts), 1)
    bw = (width - pad_l - 8) / len(counts)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for i, c in enumerate(counts):
        h = (height - pad_b - pad_t) * c / top
        parts.append(
            f'<rect x="{pad_l + i * bw:.1f}" y="{height - pad_b - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" class="bar">'
            f"<title>{edges[i]:.3g} – {edges[i + 1]:.3g}: {c}</title></rect>"
        )
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 12}">{edges[0]:.3g}</text>')
    parts.append(f'<text x="{width - 8}" y="{height - 12}" text-anchor="end">{edges[-1]:.3g}{" (log scale)" if log else ""}</text>')
    if below:
        what = escape(below_label) if below_label is not None else f"below {edges[0]:.3g}"
        parts.append(f'<text x="{width / 2:.0f}" y="{height - 12}" text-anchor="middle" class="off-axis">+ {below} {what}, not drawn</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


Point = tuple
"""``(x, y, title, href)``: a point, its tooltip and the link it leads to; ``(x, y, title, href, (low, high))``
draws the point's interval as a vertical bar."""


def scatter(series: dict[str, Sequence[Point]], width: int = 420, height: int = 220, x_label: str = "", y_label: str = "",
            named: bool = True) -> Markup:
    """Points, each series in its own colour with a legend entry; the x axis is logarithmic when every x is
    positive and they span a factor of 4 or more. With ``named``, each point's title stands beside it
    (for a few points; the tooltip has it always)."""
    colours = ["#2563eb", "#dc2626", "#059669", "#d97706"]
    pad_l, pad_r, pad_t, pad_b = 48, 14, 10, 34
    points = [p for ps in series.values() for p in ps if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        return Markup('<p class="muted">No data yet.</p>')
    xs, ys = [p[0] for p in points], [y for p in points for y in (p[1], *(p[4] if len(p) > 4 else ()))]
    log = min(xs) > 0 and max(xs) >= 4 * min(xs)
    tx = math.log10 if log else (lambda v: v)
    x0, x1, y0, y1 = tx(min(xs)), tx(max(xs)), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    mx, my = (x1 - x0) * 0.06, (y1 - y0) * 0.08  # a margin, so no point sits on the frame
    x0, x1, y0, y1 = x0 - mx, x1 + mx, y0 - my, y1 + my
    sx = lambda v: pad_l + (tx(v) - x0) / (x1 - x0) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda v: pad_t + (y1 - v) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    parts = [f'<svg class="chart scatter" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(y_label)} against {escape(x_label)}">',
             *_axes(width, height, pad_l, pad_r, y0, y1, sy, f"{min(xs):g}", f"{max(xs):g}{' (log scale)' if log else ''}", x_label)]
    for i, (name, ps) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        for x, y, title, href, *interval in ps:
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            if interval:
                low, high = interval[0]
                parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(low):.1f}" y2="{sy(high):.1f}" stroke="{colour}" stroke-width="1.5" class="interval"/>')
            parts.append(f'<a href="{escape(href)}"><circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}">'
                         f"<title>{escape(title)}: {escape(y_label)} {y:.4g}, {escape(x_label)} {x:g}</title></circle></a>")
            if named:  # beside the point, on the side with room
                right = sx(x) > (pad_l + width - pad_r) / 2
                parts.append(f'<text x="{sx(x) + (-6 if right else 6):.1f}" y="{sy(y) - 5:.1f}" text-anchor="{"end" if right else "start"}" '
                             f'class="point-name">{escape(title)}</text>')
        if len(series) > 1:
            parts.append(f'<text x="{pad_l + 8 + 130 * i}" y="{height - 18}" fill="{colour}">● {escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
