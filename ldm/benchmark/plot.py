"""The benchmark's plot: seconds per image against image size, one line per engine, drawn with PIL (no plotting
library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ldm.benchmark.settings import ENGINES

COLOURS = {"ldm": "#1f77b4", "ldm-openvino": "#d62728", "diffusers": "#2ca02c", "openvino-diffusers": "#ff7f0e",
           "sdcpp": "#9467bd"}  # fmt: skip
WIDTH, HEIGHT, MARGIN = 760, 480, 70


def plot_growth(growth: dict[str, Any], path: Path, title: str) -> None:
    """Write a PNG of each engine's median txt2img seconds against the square sizes of ``growth["size"]``."""
    sizes = sorted(growth["size"])
    series = {
        name: [growth["size"][size]["txt2img_s"][name] for size in sizes]
        for name in ENGINES
        if all(name in growth["size"][size]["txt2img_s"] for size in sizes)
    }
    top = max(max(values) for values in series.values()) * 1.1
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, upper, lower = MARGIN, WIDTH - 180, 40, HEIGHT - MARGIN

    def x_of(size: int) -> float:
        span = (sizes[-1] - sizes[0]) or 1
        return left + (size - sizes[0]) / span * (right - left)

    def y_of(seconds: float) -> float:
        return lower - seconds / top * (lower - upper)

    draw.text((left, 10), f"seconds per image: {title}", fill="black", font=font)
    draw.line([(left, upper), (left, lower), (right, lower)], fill="black")
    for k in range(6):
        seconds = top * k / 5
        draw.line([(left - 4, y_of(seconds)), (left, y_of(seconds))], fill="black")
        draw.text((8, y_of(seconds) - 6), f"{seconds:.1f} s", fill="black", font=font)
    for size in sizes:
        draw.line([(x_of(size), lower), (x_of(size), lower + 4)], fill="black")
        draw.text((x_of(size) - 20, lower + 8), f"{size}x{size}", fill="black", font=font)
    for row, (name, values) in enumerate(series.items()):
        colour = COLOURS[name]
        points = [(x_of(size), y_of(value)) for size, value in zip(sizes, values, strict=True)]
        draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.line([(right + 20, upper + 20 * row + 6), (right + 45, upper + 20 * row + 6)], fill=colour, width=3)
        draw.text((right + 52, upper + 20 * row), name, fill="black", font=font)
    image.save(path, format="PNG")
