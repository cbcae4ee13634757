"""Deterministic synthetic images: a coloured shape on a textured background.

Image ``i`` of a split depends only on ``(seed, split, i)``, so any image can be regenerated
alone and the whole pipeline runs offline. The class is ``"<colour> <shape>"``, which reads as a
natural zero-shot prompt ("a photo of a red circle").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
TEXTURES = ("plain", "stripes", "checker", "dots", "noise")
_SPLIT_IDS = {"train": 0, "test": 1}


class SyntheticShapes:
    def __init__(self, size: int = 2000, split: str = "train", seed: int = 0, image_size: int = 224):
        self.size, self.split, self.seed, self.image_size = size, split, seed, image_size
        self.classes = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]

    def __len__(self) -> int:
        return self.size

    def identity(self) -> dict[str, Any]:
        return {"dataset": "synthetic", "version": 1, "split": self.split, "size": self.size, "gen_seed": self.seed, "image_size": self.image_size}

    def where(self, index: int) -> str:
        return f"synthetic {self.split} image {index}"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        label = int(rng.integers(len(self.classes)))
        shape = SHAPES[label // len(COLOURS)]
        colour = list(COLOURS.values())[label % len(COLOURS)]
        return self._render(rng, shape, colour), label

    def _render(self, rng: np.random.Generator, shape: str, colour: tuple[int, int, int]) -> Image.Image:
        s = self.image_size
        image = Image.fromarray(_background(rng, s))
        draw = ImageDraw.Draw(image)
        radius = rng.uniform(0.12, 0.35) * s
        cx, cy = rng.uniform(radius, s - radius, size=2)
        fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "ring":
            draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.3)))
        elif shape == "square":
            angle = rng.uniform(0, np.pi / 2)
            draw.polygon(_regular(cx, cy, radius, 4, angle), fill=fill)
        elif shape == "triangle":
            draw.polygon(_regular(cx, cy, radius, 3, rng.uniform(0, 2 * np.pi)), fill=fill)
        else:
            draw.polygon(_star(cx, cy, radius, rng.uniform(0, 2 * np.pi)), fill=fill)
        return image


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    base = rng.integers(90, 250, size=3)
    other = rng.integers(60, 250, size=3)
    yy, xx = np.mgrid[0:s, 0:s]
    period = int(rng.integers(8, 40))
    if texture == "plain":
        mask = np.zeros((s, s), bool)
    elif texture == "stripes":
        mask = ((xx + yy * rng.integers(0, 2)) // period) % 2 == 0
    elif texture == "checker":
        mask = ((xx // period) + (yy // period)) % 2 == 0
    elif texture == "dots":
        mask = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
    else:
        mask = rng.random((s, s)) < 0.5
    img = np.where(mask[..., None], other, base).astype(np.int16)
    img += rng.integers(-8, 9, size=(s, s, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _regular(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * np.cos(angle + 2 * np.pi * j / n), cy + r * np.sin(angle + 2 * np.pi * j / n)) for j in range(n)]


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for j in range(10):
        rad = r if j % 2 == 0 else r * 0.45
        a = angle + np.pi * j / 5
        points.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return points
