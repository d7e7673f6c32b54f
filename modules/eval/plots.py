"""A small line plot drawn with PIL, so a sweep's result reads at a glance without matplotlib."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from modules.data.image_io import save_png

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    step = (high - low) / count
    magnitude = 10 ** len(str(int(step))) / 10 if step >= 1 else 10 ** -len(f"{step:.10f}".split(".")[1].rstrip("0"))
    step = max(round(step / magnitude) * magnitude, magnitude)
    first = (low // step) * step
    return [first + i * step for i in range(count + 2) if first + i * step <= high + step / 2]


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str, y_label: str,
              x_ticks: Optional[dict[float, str]] = None, size: tuple[int, int] = (720, 480)) -> Path:
    """One line with markers per series (label -> [(x, y)]), axes with ticks, a legend; saved as PNG."""
    width, height = size
    left, right, top, bottom = 70, 160, 40, 60
    points = [p for line in series.values() for p in line]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_ticks = _nice_ticks(min(0.0, min(ys)), max(ys))
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    draw.line([at(x_low, y_low), at(x_high, y_low)], fill="black")
    draw.line([at(x_low, y_low), at(x_low, y_high)], fill="black")
    for y in y_ticks:
        px, py = at(x_low, y)
        draw.line([(px - 4, py), (width - right, py)], fill=(225, 225, 225))
        draw.text((px - 60, py - 6), f"{y:g}", fill="black")
    for x, label in (x_ticks or {x: f"{x:g}" for x in sorted(set(xs))}).items():
        px, py = at(x, y_low)
        draw.line([(px, py), (px, py + 4)], fill="black")
        draw.text((px - 8, py + 8), label, fill="black")
    draw.text((left + (width - left - right) // 2 - 30, height - 24), x_label, fill="black")
    draw.text((8, top - 24), y_label, fill="black")
    for i, (label, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = [at(x, y) for x, y in sorted(line)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.line([(width - right + 16, top + 20 * i + 6), (width - right + 40, top + 20 * i + 6)], fill=colour, width=3)
        draw.text((width - right + 46, top + 20 * i), label, fill="black")
    save_png(np.asarray(image), path)
    return path
