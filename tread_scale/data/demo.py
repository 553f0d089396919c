"""The built-in demo dataset: procedurally drawn, class-conditional coloured shapes.

Each class is one upright shape in one colour on a dark background, with random position, a little size
and colour jitter, so a sample grid shows at a glance whether a model learned the classes. (Rotation is
left out on purpose: it would make the demo take longer to learn on a CPU.)
Images are stored in pixel space (``vae: none``), scaled to ``[-1, 1]``.
"""

from __future__ import annotations

import numpy as np

#: (name, RGB colour) of each class, by label.
DEMO_CLASSES: list[tuple[str, tuple[float, float, float]]] = [
    ("red_disc", (0.95, 0.15, 0.15)),
    ("green_square", (0.15, 0.85, 0.2)),
    ("blue_triangle", (0.2, 0.35, 1.0)),
    ("yellow_cross", (0.95, 0.9, 0.1)),
    ("magenta_ring", (0.95, 0.2, 0.9)),
    ("cyan_diamond", (0.1, 0.9, 0.95)),
]

#: Defaults of ``tread-scale convert demo`` and :class:`~tread_scale.data.sources.DemoSource`: the input of
#: ``yamls/demo.yaml``'s model (3x16x16 pixels, 6 classes), so converted demo data trains with it as is.
DEMO_RESOLUTION = 16
DEMO_NUM_CLASSES = len(DEMO_CLASSES)
DEMO_NUM_SAMPLES = 4096


def _mask(kind: str, xx: np.ndarray, yy: np.ndarray, r: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    if kind == "red_disc":
        return np.hypot(xx, yy) <= r
    if kind == "green_square":
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    if kind == "blue_triangle":
        # equilateral triangle, pointing along v
        return (v >= -r * 0.5) & (v <= r - np.sqrt(3) * np.abs(u) * 0.95)
    if kind == "yellow_cross":
        arm = r * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if kind == "magenta_ring":
        d = np.hypot(xx, yy)
        return (d <= r) & (d >= r * 0.55)
    if kind == "cyan_diamond":
        return np.abs(xx) + np.abs(yy) * 1.3 <= r * 1.1
    raise ValueError(kind)


def demo_image(index: int, resolution: int = 32, seed: int = 0, num_classes: int = len(DEMO_CLASSES)
               ) -> tuple[np.ndarray, int]:
    """Draw demo sample ``index`` deterministically.

    Args:
        index: Sample index; the label is ``index % num_classes``.
        resolution: Image side in pixels.
        seed: Dataset seed.
        num_classes: Classes to use (at most ``len(DEMO_CLASSES)``).

    Returns:
        ``(image, label)`` with ``image`` float32 ``(3, R, R)`` in ``[-1, 1]``.
    """
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise ValueError(f"demo num_classes must be in 1..{len(DEMO_CLASSES)}, got {num_classes}")
    label = index % num_classes
    rng = np.random.default_rng([seed, index])
    kind, colour = DEMO_CLASSES[label]
    ss = 4  # supersampling for anti-aliased edges
    n = resolution * ss
    coords = (np.arange(n) + 0.5) / ss
    xx, yy = np.meshgrid(coords, coords, indexing="xy")
    r = rng.uniform(0.26, 0.34) * resolution
    cx, cy = rng.uniform(r, resolution - r, size=2)
    mask = _mask(kind, xx - cx, yy - cy, r, np.pi).astype(np.float32)
    cover = mask.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))
    rgb = np.clip(np.asarray(colour) + rng.normal(0, 0.05, size=3), 0, 1).astype(np.float32)
    background = rng.uniform(0.0, 0.12)
    img = background + cover[None] * (rgb[:, None, None] - background)
    return (img * 2 - 1).astype(np.float32), label
