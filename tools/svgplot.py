"""svgplot.py — line and bar charts as plain SVG files, with no dependencies (the docs' plots).

The docs need a few simple charts and the machines here have no matplotlib, so this writes SVG by
hand: axes with "nice" ticks (linear or log10), a legend, one colour per series. The output is a
pure function of the arguments (no timestamps, fixed number formatting), so a regenerated plot
differs from the committed one only when the data does.

  line_chart(path, title, xlabel, ylabel, series, log_y=False)
      series: [(name, xs, ys)]; points whose y is None or not finite are skipped.
  bar_chart(path, title, ylabel, categories, groups, log_y=False)
      groups: [(name, values)], one value per category, drawn side by side in each category.
  write_atomically(path, text)
      what both use (and tools/plot_sdc.py, which draws its own multi-panel charts).
"""

import math
import os
import tempfile

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 60  # margins; the legend sits in the right margin
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _finite(v):
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _nice_ticks(lo, hi, count=5):
    """About `count` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=10 * magnitude)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _label(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


class _Axes:
    def __init__(self, xlo, xhi, ylo, yhi, log_y):
        self.log_y = log_y
        if log_y:
            ylo, yhi = math.floor(math.log10(ylo)), math.ceil(math.log10(yhi))
            if yhi <= ylo:
                yhi = ylo + 1
            self.yticks = [10.0 ** e for e in range(int(ylo), int(yhi) + 1)]
        else:
            self.yticks = _nice_ticks(ylo, yhi)
            ylo, yhi = self.yticks[0], self.yticks[-1]
        self.ylo, self.yhi = ylo, yhi
        self.xlo, self.xhi = xlo, xhi if xhi > xlo else xlo + 1

    def x(self, v):
        return LEFT + (v - self.xlo) / (self.xhi - self.xlo) * (WIDTH - LEFT - RIGHT)

    def y(self, v):
        u = math.log10(v) if self.log_y else v
        return HEIGHT - BOTTOM - (u - self.ylo) / (self.yhi - self.ylo) * (HEIGHT - TOP - BOTTOM)


def _frame(out, axes, title, xlabel, ylabel, xticks):
    out.append(f'<text x="{WIDTH / 2:.1f}" y="22" text-anchor="middle" font-size="15">{title}</text>')
    x0, x1 = LEFT, WIDTH - RIGHT
    y0, y1 = HEIGHT - BOTTOM, TOP
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#444"/>')
    for t in axes.yticks:
        y = axes.y(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_label(t)}</text>')
    for t, text in xticks:
        x = axes.x(t)
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle" font-size="11">{text}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 18}" text-anchor="middle" font-size="12">{xlabel}</text>')
    out.append(f'<text x="16" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 16 {(y0 + y1) / 2:.1f})">{ylabel}</text>')


def _legend(out, names):
    for i, name in enumerate(names):
        y = TOP + 10 + 18 * i
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<rect x="{WIDTH - RIGHT + 12}" y="{y - 9}" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 30}" y="{y}" font-size="11">{name}</text>')


def write_atomically(path, text):
    """Writes text to path through a temporary file in the same folder, renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".svgplot.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write(path, body):
    write_atomically(path, f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
                           f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
                           + "\n".join(body) + "\n</svg>\n")


def line_chart(path, title, xlabel, ylabel, series, log_y=False):
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if _finite(y) and (not log_y or y > 0)]
    if not points:
        raise ValueError(f"line_chart {path}: no finite points to plot")
    axes = _Axes(min(p[0] for p in points), max(p[0] for p in points),
                 min(p[1] for p in points), max(p[1] for p in points), log_y)
    body = []
    _frame(body, axes, title, xlabel, ylabel, [(t, _label(t)) for t in _nice_ticks(axes.xlo, axes.xhi)
                                               if axes.xlo <= t <= axes.xhi])
    for i, (_, xs, ys) in enumerate(series):
        pts = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in zip(xs, ys) if _finite(y) and (not log_y or y > 0))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="1.8"/>')
    _legend(body, [name for name, _, _ in series])
    _write(path, body)


def bar_chart(path, title, ylabel, categories, groups, log_y=False):
    values = [v for _, vs in groups for v in vs if _finite(v) and (not log_y or v > 0)]
    if not values:
        raise ValueError(f"bar_chart {path}: no finite values to plot")
    lo = min(values) if log_y else min(0.0, min(values))
    axes = _Axes(0, len(categories), lo, max(values), log_y)
    body = []
    _frame(body, axes, title, "", ylabel, [(i + 0.5, c) for i, c in enumerate(categories)])
    width = 0.8 / len(groups)
    base = axes.y(axes.yticks[0]) if log_y else axes.y(0.0)
    for g, (_, vs) in enumerate(groups):
        for i, v in enumerate(vs):
            if not _finite(v) or (log_y and v <= 0):
                continue
            x0, x1 = axes.x(i + 0.1 + g * width), axes.x(i + 0.1 + (g + 1) * width)
            top = axes.y(v)
            body.append(f'<rect x="{x0:.1f}" y="{min(top, base):.1f}" width="{x1 - x0:.1f}" '
                        f'height="{abs(base - top):.1f}" fill="{COLOURS[g % len(COLOURS)]}"/>')
    _legend(body, [name for name, _ in groups])
    _write(path, body)
