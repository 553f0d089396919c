"""The demo datasets' drawing: procedurally drawn, class-conditional coloured shapes (numpy only).

Each class is one upright shape in one colour on a dark background, with random position, a little size
and colour jitter, so a sample grid shows at a glance whether a model learned the classes. (Rotation is
left out on purpose: it would make the demo take longer to learn on a CPU.)
Images are stored in pixel space (``vae: none``), scaled to ``[-1, 1]``.

The *captioned* demo (:func:`demo_caption_image`, written by
:func:`~tread_scale.devtools.demo_data.write_captioned_demo`) draws one or two
shapes whose colour, kind and quadrant are free and named by the caption ("a red square at top left and a
blue circle at bottom right"), so only the prompt decides the picture. Its captions use the small fixed
vocabulary :data:`DEMO_CAPTION_VOCAB`, which a tiny local text encoder
(:func:`~tread_scale.devtools.demo_data.build_tiny_text_encoder`) tells apart word by word.
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

#: Defaults of ``tread-scale convert demo`` and :class:`~tread_scale.devtools.demo_data.DemoSource`: the input of
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


# --------------------------------------------------------------------------- captioned demo
#: Colour words of the captioned demo and their RGB (the class demo's colours).
DEMO_CAPTION_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1), "magenta": (0.95, 0.2, 0.9), "cyan": (0.1, 0.9, 0.95),
}
#: Shape words and the class demo's mask each draws with.
DEMO_CAPTION_SHAPES: dict[str, str] = {
    "circle": "red_disc", "square": "green_square", "triangle": "blue_triangle", "cross": "yellow_cross",
    "ring": "magenta_ring", "diamond": "cyan_diamond",
}
#: Position phrases and their quadrant ``(column, row)``.
DEMO_CAPTION_POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1),
}
#: Every word a captioned-demo caption uses (the tiny encoders' vocabulary).
DEMO_CAPTION_VOCAB: list[str] = ["a", "and", "at", "top", "bottom", "left", "right",
                                 *DEMO_CAPTION_COLOURS, *DEMO_CAPTION_SHAPES]
#: Defaults of the captioned demo: 3x32x32 pixels (a quadrant must hold a legible shape), captions of at
#: most 14 words, so 16 tokens hold them with the encoders' special tokens.
DEMO_CAPTION_RESOLUTION = 32
DEMO_CAPTION_MAX_LENGTH = 16


def demo_caption_bucket(index: int, resolution: int = DEMO_CAPTION_RESOLUTION) -> tuple[int, int]:
    """``(height, width)`` of captioned-demo sample ``index`` with aspect-ratio buckets: half the samples square,
    a quarter landscape 5:3, a quarter portrait 3:5 (each about the square's area; sides even multiples of
    ``resolution / 8``)."""
    u = resolution // 8
    return {2: (6 * u, 10 * u), 3: (10 * u, 6 * u)}.get(index % 4, (resolution, resolution))


def _caption_layout(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(colour, shape, position)`` of each drawn shape, in the order of :data:`DEMO_CAPTION_POSITIONS`."""
    count = int(rng.integers(1, 3))
    positions = sorted(rng.choice(len(DEMO_CAPTION_POSITIONS), size=count, replace=False).tolist())
    colours, shapes, names = list(DEMO_CAPTION_COLOURS), list(DEMO_CAPTION_SHAPES), list(DEMO_CAPTION_POSITIONS)
    return [(colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))], names[p])
            for p in positions]


def _caption_rng(index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 7])  # a stream apart from the class demo's


def demo_caption(index: int, seed: int = 0) -> str:
    """The caption of captioned-demo sample ``index`` (without drawing it)."""
    return " and ".join(f"a {c} {s} at {p}" for c, s, p in _caption_layout(_caption_rng(index, seed)))


def demo_caption_image(index: int, resolution: int = DEMO_CAPTION_RESOLUTION, seed: int = 0,
                       size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """Draw captioned-demo sample ``index`` deterministically.

    Args:
        index: Sample index.
        resolution: Image side in pixels (even).
        seed: Dataset seed.
        size: ``(height, width)`` to draw at instead of the square (an aspect-ratio bucket); the layout and
            caption are the same, quadrants follow the canvas.

    Returns:
        ``(image, caption)`` with ``image`` float32 ``(3, H, W)`` in ``[-1, 1]``, e.g.
        ``"a red square at top left and a blue circle at bottom right"``.
    """
    rng = _caption_rng(index, seed)
    layout = _caption_layout(rng)
    height, width = size or (resolution, resolution)
    ss = 4
    xx, yy = np.meshgrid((np.arange(width * ss) + 0.5) / ss, (np.arange(height * ss) + 0.5) / ss, indexing="xy")
    background = rng.uniform(0.0, 0.12)
    img = np.full((3, height, width), background, np.float32)
    qx, qy = width / 4, height / 4
    for colour, shape, position in layout:
        col, row = DEMO_CAPTION_POSITIONS[position]
        r = rng.uniform(0.15, 0.2) * min(height, width)
        slack_x, slack_y = max(qx - r, 0.0) * 0.8, max(qy - r, 0.0) * 0.8
        cx = (2 * col + 1) * qx + rng.uniform(-slack_x, slack_x)
        cy = (2 * row + 1) * qy + rng.uniform(-slack_y, slack_y)
        mask = _mask(DEMO_CAPTION_SHAPES[shape], xx - cx, yy - cy, r, np.pi).astype(np.float32)
        cover = mask.reshape(height, ss, width, ss).mean(axis=(1, 3))
        rgb = np.clip(np.asarray(DEMO_CAPTION_COLOURS[colour]) + rng.normal(0, 0.05, size=3), 0, 1).astype(np.float32)
        img = img + cover[None] * (rgb[:, None, None] - img)
    caption = " and ".join(f"a {c} {s} at {p}" for c, s, p in layout)
    return (img * 2 - 1).astype(np.float32), caption
