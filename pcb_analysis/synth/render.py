"""Pixels of one synthetic image, and its PNG bytes.

`render_image(cfg, img, specs)` -> RGB uint8 [size, size, 3]. The pixel noise of image `i` comes from
its own generator `default_rng([cfg.seed, i, 1])`, so rendering (or skipping) one image never changes
another. Each object is filled over exactly the pycocotools mask of its annotated polygon, in drawing
order, with its colour and its pattern (plain, stripes, dots or a rim);
a smooth luminance texture then covers the whole image (docs/synth.md §5). `png_bytes` encodes with a
fixed zlib level, so the same pixels always give the same bytes.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pcb_analysis.synth.layout import ImageLayout
from pcb_analysis.synth.plan import COLOURS, ClassSpec, SynthConfig

# Patterns of the common siblings, strong enough for a tiny detector to learn (generator v2).
STRIPE_SHADE = 0.5  # stripes: the colour times this
RIM_FRAC = 1 / 20  # rim width as a fraction of the image side (at least 2 px)
RIM_SHADE = 0.4


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        p = np.pad(out, 1, constant_values=False)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids (yy, xx), each [size, size] float64, read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def render_image(cfg: SynthConfig, img: ImageLayout, specs: Sequence[ClassSpec]) -> np.ndarray:
    """RGB uint8 [H, W, 3]: plain background, the objects' exact polygon masks in drawing order, then a
    smooth luminance texture (low-frequency noise and two faint waves) over everything."""
    rng = np.random.default_rng([cfg.seed, img.id, 1])
    size = cfg.size
    yy, xx = _grid(size)
    bg = _rgb(float(rng.random()), float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.45, 0.8)))
    canvas = np.empty((size, size, 3))
    canvas[:] = bg
    if img.objects:
        rles = mask_utils.frPyObjects([list(o.polygon) for o in img.objects], size, size)
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode(rles).astype(bool)  # [H, W, n]
    period = max(4.0, size / 12)
    for j, obj in enumerate(img.objects):
        spec = specs[obj.class_index]
        h, s, v = COLOURS[spec.colour]
        h += rng.normal(0.0, 0.01)
        s *= rng.uniform(0.9, 1.1)
        v *= rng.uniform(0.9, 1.08)
        colour = _rgb(h, s, v)
        xs, ys = obj.polygon[0::2], obj.polygon[1::2]
        window = (
            slice(max(0, int(min(ys)) - 1), min(size, int(max(ys)) + 2)),
            slice(max(0, int(min(xs)) - 1), min(size, int(max(xs)) + 2)),
        )
        mask = masks[..., j][window]
        region = canvas[window]
        if spec.variant in ("striped", "dotted"):
            angle = rng.uniform(0.0, np.pi)
            phase = rng.uniform(0.0, 1.0, size=2)
            u = xx[window] * math.cos(angle) + yy[window] * math.sin(angle)
            if spec.variant == "striped":
                pattern = (u / period + phase[0]) % 1.0 < 0.5
                alt = colour * STRIPE_SHADE
            else:
                w = -xx[window] * math.sin(angle) + yy[window] * math.cos(angle)
                du = (u / (1.4 * period) + phase[0]) % 1.0 - 0.5
                dw = (w / (1.4 * period) + phase[1]) % 1.0 - 0.5
                pattern = du * du + dw * dw < 0.28**2
                alt = _rgb(h, s * 0.4, min(1.0, v + 0.25))
            region[mask] = colour
            region[mask & pattern] = alt
        else:
            region[mask] = colour
        if spec.colour2:
            h2, s2, v2 = COLOURS[spec.colour2]
            angle = rng.uniform(0.0, 2 * np.pi)
            u = xx[window] * math.cos(angle) + yy[window] * math.sin(angle)
            cut = np.quantile(u[mask], spec.colour2_frac)
            region[mask & (u < cut)] = _rgb(h2 + rng.normal(0.0, 0.01), s2, v2)
        if spec.variant == "rimmed":
            rim = mask & ~_erode(mask, max(2, round(size * RIM_FRAC)))
            region[rim] = colour * RIM_SHADE
    coarse = max(2, size // 4)
    noise = rng.normal(0.0, 7.0, size=(coarse, coarse)).astype(np.float32)
    texture = np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BILINEAR))
    for _ in range(2):
        fx, fy = rng.uniform(-3.0, 3.0, size=2)
        texture = texture + rng.uniform(2.0, 5.0) * np.sin(
            2 * np.pi * (fx * xx + fy * yy) / size + rng.uniform(0, 2 * np.pi)
        )
    canvas += texture[..., None]
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

