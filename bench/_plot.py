"""A line plot as a PNG without matplotlib (PIL only): enough for a reward-vs-wall-clock figure."""

from __future__ import annotations

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str, title: str, xlabel: str, ylabel: str,
              hline: float | None = None, size=(900, 560)) -> str:
    """series: label -> (xs, ys). Writes `path` (PNG) and returns it."""
    try:  # matplotlib when present: a nicer figure
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(size[0] / 100, size[1] / 100), dpi=100)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        if hline is not None:
            ax.axhline(hline, ls="--", c="grey", label="reward target")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        pass
    W, H = size
    left, right, top, bottom = 80, 220, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs_all = [x for xs, _ in series.values() for x in xs] or [0, 1]
    ys_all = [y for _, ys in series.values() for y in ys] + ([hline] if hline is not None else []) or [0, 1]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(5):  # ticks
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        d.text((px(xv) - 15, H - bottom + 5), f"{xv:.0f}", fill="black")
        d.text((5, py(yv) - 6), f"{yv:.4f}", fill="black")
    if hline is not None:
        for xa in range(left, W - right, 12):
            d.line([xa, py(hline), xa + 6, py(hline)], fill=(120, 120, 120))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        d.line([W - right + 10, top + 10 + 16 * i, W - right + 30, top + 10 + 16 * i], fill=c, width=3)
        d.text((W - right + 35, top + 4 + 16 * i), label, fill="black")
    d.text((W / 2 - 100, 10), title, fill="black")
    d.text((W / 2 - 40, H - 25), xlabel, fill="black")
    d.text((5, 15), ylabel, fill="black")
    img.save(path)
    return path
