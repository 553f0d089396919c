"""Aspect-ratio buckets for ``tread-scale convert images|captions --buckets SPEC``.

A bucket is a pixel size ``(width, height)``. Each image goes to the bucket whose aspect ratio is nearest to
its own in log space (:func:`assign`), is resized so that it covers the bucket with the least cropping and
centre-cropped to it (:func:`fit`). Everything here is a pure function of integers.

``SPEC`` is either

* ``AREApx:MULT`` (e.g. ``1024px:64``): buckets of about ``AREA²`` pixels whose sides are multiples of
  ``MULT``, SDXL-style. For each width ``w = MULT·k`` the height is the multiple of ``MULT`` nearest to
  ``AREA²/w``; pairs whose aspect ratio lies outside ``[1/4, 4]`` are dropped, and each pair's transpose is
  added so that portrait and landscape images get mirrored buckets. The square ``AREA x AREA`` is always
  one of them (``AREA`` must be a multiple of ``MULT``);
* an explicit list ``WxH,WxH,...`` (e.g. ``32x32,48x16,16x48``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from tread_scale.errors import ConfigError

#: Most extreme aspect ratio (either way) of a generated bucket.
MAX_ASPECT = 4
#: How every bucketed dataset's images were made to fit their bucket (recorded in the metadata).
CROP_RULE = ("resize to cover the nearest-aspect bucket (scale = max(bucket_w/W, bucket_h/H)), centre crop; "
             "crop_box per sample = (top, left, height, width) in original pixels")

_AREA_RE = re.compile(r"(\d+)px:(\d+)")
_SIZE_RE = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class BucketSpec:
    """A parsed ``--buckets`` value.

    Attributes:
        spec: The SPEC string as given.
        buckets: Pixel sizes ``(width, height)``, sorted by ``(height, width)``: the order of the buckets in a
            converted dataset.
        base: The reference bucket ``(width, height)``: the square of side ``AREA`` for ``AREApx:MULT``, the
            largest-area bucket (ties: the later one in ``buckets``) for an explicit list.
    """

    spec: str
    buckets: tuple[tuple[int, int], ...]
    base: tuple[int, int]


class Fit(NamedTuple):
    """How one image fits its bucket.

    Attributes:
        scaled_size: ``(height, width)`` of the whole image once resized to cover the bucket.
        crop_box: ``(top, left, height, width)`` of the kept region, in the original image's pixels.
    """

    scaled_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]


def _round(x: Fraction) -> int:
    """Nearest integer, halves up (deterministic, unlike ``round``'s halves to even)."""
    return math.floor(x + Fraction(1, 2))


def _check_multiple(value: int, multiple: int, what: str, spec: str) -> None:
    if value <= 0:
        raise ConfigError(f"--buckets {spec!r}: {what} must be positive")
    if value % multiple:
        raise ConfigError(f"--buckets {spec!r}: {what} is not a multiple of {multiple} (the VAE's downsampling "
                          "factor: bucket sides must be)")


def area_buckets(area: int, mult: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` buckets of about ``area²`` pixels with sides multiples of ``mult``.

    Args:
        area: Side of the square of the target area, in pixels (``1024`` for ``1024px``).
        mult: Every side is a multiple of this.

    Returns:
        The buckets, sorted by ``(height, width)``, aspect ratios within ``[1/4, 4]``, the square included.
    """
    target = area * area
    found = {(area, area)}
    for k in range(1, (2 * MAX_ASPECT * area) // mult + 2):
        w = mult * k
        h = mult * _round(Fraction(target, w * mult))
        if h > 0 and Fraction(1, MAX_ASPECT) <= Fraction(w, h) <= MAX_ASPECT:
            found |= {(w, h), (h, w)}
    return sorted(found, key=lambda b: (b[1], b[0]))


def parse_buckets(spec: str, multiple: int = 1) -> BucketSpec:
    """Parse a ``--buckets`` value (see the module's docstring).

    Args:
        spec: ``AREApx:MULT`` or ``WxH,WxH,...``.
        multiple: Every side must be a multiple of this: the VAE's downsampling factor (1 for pixels).

    Returns:
        The buckets.

    Raises:
        ConfigError: Naming the spec and the entry at fault (not a size, not positive, not a multiple of
            ``multiple``, listed twice, or an area that is not a multiple of ``MULT``).
    """
    text = spec.strip()
    m = _AREA_RE.fullmatch(text)
    if m:
        area, mult = int(m.group(1)), int(m.group(2))
        _check_multiple(mult, multiple, f"MULT {mult}", spec)
        _check_multiple(area, multiple, f"AREA {area}px", spec)
        if area % mult:
            raise ConfigError(f"--buckets {spec!r}: AREA {area}px is not a multiple of MULT {mult} (the square "
                              f"{area}x{area} must be a bucket)")
        return BucketSpec(spec, tuple(area_buckets(area, mult)), (area, area))
    sizes: list[tuple[int, int]] = []
    for entry in text.split(","):
        m = _SIZE_RE.fullmatch(entry.strip().lower())
        if not m:
            raise ConfigError(f"--buckets {spec!r}: entry {entry.strip()!r} is not WIDTHxHEIGHT (e.g. 48x32); the "
                              "spec is either AREApx:MULT (e.g. 1024px:64) or a comma list of WIDTHxHEIGHT")
        w, h = int(m.group(1)), int(m.group(2))
        for side in (w, h):
            _check_multiple(side, multiple, f"entry {entry.strip()!r}: side {side}", spec)
        if (w, h) in sizes:
            raise ConfigError(f"--buckets {spec!r}: entry {entry.strip()!r} is listed twice")
        sizes.append((w, h))
    ordered = tuple(sorted(sizes, key=lambda b: (b[1], b[0])))
    base = max(ordered, key=lambda b: b[0] * b[1])
    base = [b for b in ordered if b[0] * b[1] == base[0] * base[1]][-1]
    return BucketSpec(spec, ordered, base)


def assign(width: int, height: int, buckets: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image: the nearest aspect ratio in log space.

    Ties go to the larger-area bucket, then to the one first in ``(height, width)`` order (so a tie
    between mirrored buckets goes to the landscape one). Ratios are compared exactly (no rounding).

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        buckets: ``(width, height)`` sizes.

    Returns:
        The chosen ``(width, height)``.

    Raises:
        ConfigError: If ``buckets`` is empty or the image size is not positive.
    """
    if not buckets:
        raise ConfigError("no buckets to assign an image to")
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size {width}x{height} is not positive")

    def key(b: tuple[int, int]):
        ratio = Fraction(width * b[1], height * b[0])  # (W/H) / (bw/bh)
        return (max(ratio, 1 / ratio), -b[0] * b[1], b[1], b[0])

    return min(buckets, key=key)


def fit(width: int, height: int, bucket: tuple[int, int]) -> Fit:
    """Resize to cover ``bucket`` with the smallest crop, then centre-crop the excess.

    ``scale = max(bucket_w / width, bucket_h / height)``; the kept region is the bucket's size divided by
    ``scale``, centred (rounded to whole original pixels, an odd excess leaving its extra pixel at the
    bottom/right).

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        bucket: ``(width, height)`` of the bucket.

    Returns:
        :class:`Fit`: the resized image's ``(height, width)`` and the crop box ``(top, left, height, width)``
        in original pixels.
    """
    bw, bh = bucket
    scale = max(Fraction(bw, width), Fraction(bh, height))
    crop_w = min(width, max(1, _round(bw / scale)))
    crop_h = min(height, max(1, _round(bh / scale)))
    return Fit((_round(height * scale), _round(width * scale)),
               ((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w))
