"""Inputs that ``tread-scale convert`` turns into MDS shards.

A source is a small picklable description. :meth:`Source.plan` lists the work in the parent process
(raising early for an empty folder or unlabelled files); :meth:`Source.load` turns a slice of that list into
samples inside a worker process.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tread_scale.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    """One converted sample: a float latent ``(C, H, W)``, its label and a stable id.

    Captioned sources add ``text``: ``text_emb`` ``(L, D)``, ``text_mask`` ``(L,)``, ``text_pooled``
    ``(P,)``, ``caption`` (str), ``truncated`` (bool) and ``where`` (the input, for error messages).
    Bucketed image sources (``--buckets``) add ``orig_size`` ``(H, W)`` of the original image and
    ``crop_box`` ``(top, left, height, width)`` of the region kept, in original pixels.
    """

    id: int
    latent: np.ndarray
    label: int
    text: dict | None = None
    orig_size: tuple[int, int] | None = None
    crop_box: tuple[int, int, int, int] | None = None


@dataclass
class Plan:
    """What a source will produce: the work items and the facts of the data (``text``: captioned sources)."""

    items: list[Any]
    latent_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str] | None = None
    vae: str = "none"
    scaling_factor: float = 1.0
    text: Any = None  # TextMetadata of captioned sources
    #: Bucketed sources: one dict per bucket in plan order (``latent_shape`` [C, h, w], ``image_size`` [H, W],
    #: ``start``, ``count``: its items are ``items[start:start + count]``); ``None`` for square datasets.
    buckets: list[dict] | None = None
    bucket_spec: str | None = None


class Source:
    """Base class of conversion sources."""

    kind = "base"

    def describe(self) -> dict:
        """A JSON-able description: part of the conversion fingerprint and of the metadata."""
        raise NotImplementedError

    def plan(self) -> Plan:
        raise NotImplementedError

    def load(self, items: Sequence[tuple[int, Any]], plan: Plan) -> Iterator[Sample]:
        """Produce the samples of ``(id, item)`` pairs taken from :attr:`Plan.items`."""
        raise NotImplementedError

    def empty_prompt(self, plan: Plan) -> dict[str, np.ndarray] | None:
        """Captioned sources: the empty prompt's ``text_emb``, ``text_mask``, ``text_pooled`` (in a worker)."""
        return None


def check_sample(latent: np.ndarray, label: int, plan: Plan, where: str,
                 shape: Sequence[int] | None = None) -> None:
    """Raise :class:`DatasetError` naming ``where`` for a wrong shape, non-finite values or a bad label.

    ``shape``: the expected latent shape where it is not the plan's (a bucketed sample's bucket).
    """
    if shape is not None and tuple(latent.shape) != tuple(shape):
        raise DatasetError(f"{where}: latent shape {tuple(latent.shape)} differs from its bucket's {tuple(shape)}")
    if shape is None and tuple(latent.shape) != tuple(plan.latent_shape):
        raise DatasetError(f"{where}: latent shape {tuple(latent.shape)} differs from the dataset's "
                           f"{tuple(plan.latent_shape)} (set by the first file)")
    if not np.issubdtype(latent.dtype, np.floating):
        raise DatasetError(f"{where}: latent dtype {latent.dtype} is not a float type")
    if not np.isfinite(latent).all():
        raise DatasetError(f"{where}: latent contains NaN or Inf values")
    if not 0 <= int(label) < plan.num_classes:
        raise DatasetError(f"{where}: label {label} is outside 0..{plan.num_classes - 1}")


def files_stamp(files: Sequence[Path]) -> str:
    """A stable digest of file names, sizes and modification times (changes when the input changes)."""
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.as_posix()}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- .npy / .npz folder
def _npz_keys(z: Any, path: Path) -> tuple[str, str | None]:
    latent_key = next((k for k in ("latent", "latents", "x") if k in z.files), None)
    if latent_key is None:
        raise DatasetError(f"{path}: .npz holds {z.files}; expected a 'latent' (or 'latents') array")
    label_key = next((k for k in ("label", "labels", "y") if k in z.files), None)
    return latent_key, label_key


@dataclass
class NpyFolderSource(Source):
    """A folder of precomputed latents.

    Each ``.npy`` file holds one ``(C, H, W)`` latent. Each ``.npz`` file holds ``latent`` (``(C, H, W)``
    or a batch ``(N, C, H, W)``) and optionally ``label`` (scalar or ``(N,)``). Labels of files without
    one come from ``labels.csv`` in the folder (rows ``path,label``, path relative to the folder), or
    else from class subfolders (sorted names → labels 0, 1, …).

    Args:
        folder: Root folder.
        num_classes: Number of classes; default ``max(label) + 1``.
    """

    folder: str = ""
    num_classes: int | None = None
    kind = "npy"

    def describe(self) -> dict:
        files = sorted(self._files())
        return {"kind": self.kind, "folder": str(Path(self.folder).resolve()), "num_classes": self.num_classes,
                "files": len(files), "stamp": files_stamp(files)}

    def _files(self) -> list[Path]:
        root = Path(self.folder)
        if not root.is_dir():
            raise DatasetError(f"input folder {self.folder!r} does not exist")
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".npy", ".npz"))

    def _csv_labels(self) -> dict[str, int]:
        path = Path(self.folder) / "labels.csv"
        if not path.is_file():
            return {}
        labels = {}
        with path.open(newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or (lineno == 1 and not row[-1].strip().lstrip("-").isdigit()):
                    continue
                try:
                    labels[row[0].strip()] = int(row[1])
                except (IndexError, ValueError):
                    raise DatasetError(f"{path}:{lineno}: expected 'path,label', got {row!r}") from None
        return labels

    def plan(self) -> Plan:
        root = Path(self.folder)
        files = self._files()
        if not files:
            raise DatasetError(f"input folder {self.folder!r} holds no .npy or .npz files")
        csv_labels = self._csv_labels()
        subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) == 2})
        use_dirs = not csv_labels and subdirs and all(len(p.relative_to(root).parts) == 2 for p in files)
        class_names = subdirs if use_dirs else None
        items: list[tuple[str, int, int]] = []
        shape = None
        for p in files:
            rel = p.relative_to(root).as_posix()
            file_label = csv_labels.get(rel, class_names.index(p.parent.name) if use_dirs else None)
            if p.suffix == ".npy":
                arr = np.load(p, mmap_mode="r")
                if file_label is None:
                    raise DatasetError(f"{p}: no label: add it to {root / 'labels.csv'} (path,label), use class "
                                       "subfolders, or store .npz files with a 'label' array")
                shape = shape or tuple(arr.shape)
                items.append((rel, -1, int(file_label)))
                continue
            with np.load(p) as z:
                latent_key, label_key = _npz_keys(z, p)
                lat = z[latent_key]
                labels = z[label_key] if label_key else None
            batched = lat.ndim == 4
            n = lat.shape[0] if batched else 1
            shape = shape or tuple(lat.shape[1:] if batched else lat.shape)
            if labels is None:
                if file_label is None:
                    raise DatasetError(f"{p}: no 'label' array and no label from labels.csv or a class subfolder")
                labels = np.full(n, file_label)
            labels = np.atleast_1d(labels)
            if len(labels) != n:
                raise DatasetError(f"{p}: {n} latents but {len(labels)} labels")
            items += [(rel, i if batched else -1, int(labels[i])) for i in range(n)]
        if len(shape) != 3:
            raise DatasetError(f"{files[0]}: latents must be (C, H, W) or (N, C, H, W), got shape {shape}")
        num_classes = self.num_classes or (max(it[2] for it in items) + 1)
        return Plan(items, shape, num_classes, class_names)

    def load(self, items: Sequence[tuple[str, int, int]], plan: Plan) -> Iterator[Sample]:
        root = Path(self.folder)
        cache: tuple[str, Any] | None = None
        for item_id, (rel, index, label) in items:
            path = root / rel
            where = f"{path}" + (f"[{index}]" if index >= 0 else "")
            if path.suffix == ".npy":
                latent = np.load(path)
            else:
                if cache is None or cache[0] != rel:
                    with np.load(path) as z:
                        latent_key, _ = _npz_keys(z, path)
                        cache = (rel, z[latent_key])
                latent = cache[1][index] if index >= 0 else cache[1]
            check_sample(latent, label, plan, where)
            yield Sample(item_id, latent.astype(np.float32), label)


# --------------------------------------------------------------------------- image folder
def _load_image(path: Path, resolution: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``resolution`` and return ``(3, R, R)`` float32 in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        im = im.resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0


def aligned_chunks(ids: Sequence[int], total: int, size: int, starts: Sequence[int] = ()) -> Iterator[range]:
    """The chunks ``[k*size, min((k+1)*size, total))`` of a plan that hold any of ``ids``, in order.

    Encoders run on whole chunks, whoever owns their items: a group that owns part of a chunk still encodes
    all of it and keeps its own rows. A batch's content, shape and random draws are then those of the
    chunk alone, so ``--processes N`` writes the same bits as one process, and resumption too.

    ``starts``: the first plan index of each bucket of a bucketed plan (ascending). Chunks are then
    aligned to their bucket's start, ``[s + k*size, min(s + (k+1)*size, next start))``, so a chunk never
    mixes image sizes.
    """
    seen: set[int] = set()
    for i in ids:
        b = bisect.bisect_right(starts, i) - 1
        lo = starts[b] if b >= 0 else 0
        hi = starts[b + 1] if b + 1 < len(starts) else total
        k = (i - lo) // size
        if (lo, k) not in seen:
            seen.add((lo, k))
            yield range(lo + k * size, min(lo + (k + 1) * size, hi))


class ImageEncoder:
    """Pixels → stored latents: through a local VAE (float32, latents sampled with a seed per chunk), or
    as they are for ``vae="none"``.

    Args:
        vae: Local ``AutoencoderKL`` folder, or ``none``.
        device: Device of the VAE.
        seed: Seed of the latent sampling; a chunk starting at item ``i`` draws with ``mix_seed(seed, i)``.
    """

    def __init__(self, vae: str, device: str, seed: int) -> None:
        self.device, self.seed, self.vae = device, seed, None
        if vae != "none":
            from tread_scale.data.conversion.vae import load_vae

            self.vae = load_vae(vae, device)

    def __call__(self, pixels: np.ndarray, chunk_start: int) -> np.ndarray:
        if self.vae is None:
            return pixels
        import torch

        from tread_scale.data.conversion.vae import encode
        from tread_scale.rng import mix_seed

        gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, chunk_start))
        return encode(self.vae, torch.from_numpy(pixels).to(self.device), generator=gen).cpu().numpy()


def vae_facts(vae: str) -> tuple[int, int, dict]:
    """The latent channels, downsampling factor and :class:`Plan` keywords (``vae``, ``scaling_factor``) of the
    VAE folder ``vae``; ``(3, 1, {})`` for ``none`` (pixels).

    Raises:
        ConfigError: If the VAE folder cannot be loaded.
    """
    if vae == "none":
        return 3, 1, {}
    from tread_scale.data.conversion.vae import load_vae, vae_downsample, vae_scaling_factor

    model = load_vae(vae)
    return (int(model.config.latent_channels), vae_downsample(model),
            {"vae": str(getattr(model.config, "_name_or_path", "") or Path(vae).name),
             "scaling_factor": vae_scaling_factor(model)})


def vae_plan(vae: str, resolution: int) -> dict:
    """The latent facts of images of side ``resolution`` through the VAE folder ``vae`` (or ``none``).

    Returns:
        ``latent_shape``, ``vae`` (its id) and ``scaling_factor``: keyword arguments of :class:`Plan`.

    Raises:
        ConfigError: If the VAE folder cannot be loaded.
        DatasetError: If ``resolution`` is not divisible by the VAE's downsampling factor.
    """
    channels, f, facts = vae_facts(vae)
    if resolution % f:
        raise DatasetError(f"resolution {resolution} is not divisible by the VAE's downsampling factor {f}")
    return {"latent_shape": (channels, resolution // f, resolution // f), **facts}


# --------------------------------------------------------------------------- aspect-ratio buckets
@dataclass
class BucketLayout:
    """Where the images of a bucketed source go (:func:`plan_buckets`).

    Attributes:
        order: Per planned item, bucket by bucket: ``(index into the given paths, bucket index, original
            (H, W), crop box (top, left, height, width) in original pixels)``. Images PIL cannot open are
            left out (with a warning naming them).
        plan: Keyword arguments of :class:`Plan`: ``latent_shape`` (the spec's base bucket), ``buckets``
            (non-empty ones only), ``bucket_spec``, and the VAE's facts.
    """

    order: list[tuple[int, int, tuple[int, int], tuple[int, int, int, int]]]
    plan: dict


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header (PIL opens lazily)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def image_sizes(paths: Sequence[Path], threads: int = 16) -> list[tuple[int, int] | Exception]:
    """``(width, height)`` of each image in order, or the error that reading its header raised; headers are read
    by ``threads`` threads (on a network file system the reads wait, not compute)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path: Path) -> tuple[int, int] | Exception:
        try:
            return image_size(path)
        except (OSError, ValueError) as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(read, paths))


def plan_buckets(paths: Sequence[Path], spec: str, vae: str) -> BucketLayout:
    """Assign each image to its aspect-ratio bucket and order the items bucket by bucket.

    Buckets come in the spec's order (sorted by the latent's ``(height, width)``); items keep their given
    order within a bucket, so each bucket is a contiguous range of sample ids.

    Args:
        paths: The images, in the source's order.
        spec: The ``--buckets`` value (:func:`~tread_scale.data.conversion.buckets.parse_buckets`).
        vae: The VAE folder or ``none``: its downsampling factor must divide every bucket side.

    Raises:
        ConfigError: For a bad spec (naming the entry) or VAE folder.
        DatasetError: If no image can be read.
    """
    from tread_scale.data.conversion.buckets import assign, fit, parse_buckets

    channels, f, facts = vae_facts(vae)
    parsed = parse_buckets(spec, multiple=f)
    index = {b: k for k, b in enumerate(parsed.buckets)}
    placed: list[list[tuple[int, tuple[int, int], tuple[int, int, int, int]]]] = [[] for _ in parsed.buckets]
    for j, (path, size) in enumerate(zip(paths, image_sizes(paths))):
        if isinstance(size, Exception):
            log.warning("skipping %s: cannot be read as an image (%s)", path, size)
            continue
        w, h = size
        bucket = assign(w, h, parsed.buckets)
        placed[index[bucket]].append((j, (h, w), tuple(fit(w, h, bucket).crop_box)))
    if not any(placed):
        raise DatasetError(f"none of the {len(paths)} image(s) can be read (first: {paths[0] if paths else None})")
    order, buckets = [], []
    for (bw, bh), members in zip(parsed.buckets, placed):
        if members:
            k = len(buckets)
            buckets.append({"latent_shape": [channels, bh // f, bw // f], "image_size": [bh, bw],
                            "start": len(order), "count": len(members)})
            order += [(j, k, orig, crop) for j, orig, crop in members]
    bw, bh = parsed.base
    return BucketLayout(order, {"latent_shape": (channels, bh // f, bw // f), "buckets": buckets,
                                "bucket_spec": spec, **facts})


def bucket_starts(plan: Plan) -> list[int]:
    """The first plan index of each bucket (empty for a square plan): ``starts`` of :func:`aligned_chunks`."""
    return [b["start"] for b in plan.buckets] if plan.buckets else []


def load_bucketed(path: Path, orig: Sequence[int], crop: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``crop`` (top, left, height, width) out of an image, then resize it to ``size`` (H, W).

    Cropping first keeps every output pixel a function of the crop box's pixels alone.

    Returns:
        ``(3, H, W)`` float32 in [-1, 1].

    Raises:
        DatasetError: If the image's size is no longer ``orig`` (H, W), as planned (it changed meanwhile).
    """
    from PIL import Image

    top, left, h, w = (int(x) for x in crop)
    with Image.open(path) as im:
        if (im.size[1], im.size[0]) != tuple(orig):
            raise DatasetError(f"{path}: image is {im.size[1]}x{im.size[0]} (HxW) but was {orig[0]}x{orig[1]} when "
                               "the conversion was planned; re-run it")
        im = im.convert("RGB").crop((left, top, left + w, top + h))  # only these pixels (no filter taps outside)
        im = im.resize((int(size[1]), int(size[0])), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0


def bucketed_item_loader(plan: Plan, path_of: Callable[[int], Path]) -> Callable[[int], np.ndarray]:
    """Plan index → pixels of a bucketed plan whose items end with ``(bucket, orig, crop)``."""

    def pixels_of(i: int) -> np.ndarray:
        bucket, orig, crop = plan.items[i][-3:]
        return load_bucketed(path_of(i), orig, crop, plan.buckets[bucket]["image_size"])

    return pixels_of


def encode_image_chunks(ids: Sequence[int], total: int, batch_size: int, path_of, resolution: int,
                        encoder: ImageEncoder, *, pixels_of: Callable[[int], np.ndarray] | None = None,
                        starts: Sequence[int] = ()) -> Iterator[tuple[range, np.ndarray, list[bool]]]:
    """Read and encode the images of the aligned chunks holding ``ids`` (see :func:`aligned_chunks`).

    Args:
        ids: Plan indices this worker owns.
        total: Items in the plan.
        batch_size: Chunk size (images per encoder forward).
        path_of: Plan index → image path.
        resolution: Image side.
        encoder: Pixels → latents.
        pixels_of: Plan index → ``(3, H, W)`` pixels, in place of the square crop of ``resolution`` (bucketed
            plans: :func:`load_bucketed`).
        starts: Bucketed plans: each bucket's first plan index (chunks never cross them).

    Yields:
        ``(chunk, latents, readable)``: a row per chunk item; an unreadable image's row holds a copy of the
        chunk's first readable one (dropped by the caller; a warning names images this worker owns).
    """
    owned = set(ids)
    for chunk in aligned_chunks(ids, total, batch_size, starts):
        pixels: list[np.ndarray | None] = []
        for i in chunk:
            try:
                pixels.append(pixels_of(i) if pixels_of is not None else _load_image(path_of(i), resolution))
            except (OSError, ValueError) as e:
                if i in owned:
                    log.warning("skipping %s: cannot be read as an image (%s)", path_of(i), e)
                pixels.append(None)
        readable = [p is not None for p in pixels]
        if not any(ok and i in owned for i, ok in zip(chunk, readable)):
            continue
        fill = next(p for p in pixels if p is not None)
        yield chunk, encoder(np.stack([fill if p is None else p for p in pixels]), chunk.start), readable


@dataclass
class ImageFolderSource(Source):
    """Images in one subfolder per class (sorted names → labels 0, 1, …).

    Files are centre-cropped and resized to ``resolution``, then encoded by the VAE at ``vae`` (a local
    ``save_pretrained`` folder) in float32, or stored as pixels in [-1, 1] when ``vae`` is ``none``.
    Files that are not images (by suffix, or that PIL cannot open) are **skipped with a warning naming
    them**; an input with no image at all is an error.

    Args:
        folder: Root folder with one subfolder per class.
        resolution: Image side after crop and resize.
        vae: Local VAE folder, or ``none``.
        batch_size: Images per VAE forward: the plan is cut into aligned chunks of this size
            (:func:`aligned_chunks`), so the output does not depend on ``--processes``.
        seed: Seed of the latent sampling (``latent_dist.sample``; ``mix_seed(seed, chunk start)`` per chunk).
        device: Device for encoding.
        buckets: Aspect-ratio buckets (``AREApx:MULT`` or ``WxH,...``; :mod:`~tread_scale.data.conversion.buckets`)
            in place of the square crop: each image is resized to cover its nearest-aspect bucket and
            centre-cropped, the items ordered bucket by bucket, and ``orig_size``/``crop_box`` stored per
            sample. ``resolution`` is then unused. ``None``: square crops, as before.
    """

    folder: str = ""
    resolution: int = 256
    vae: str = "none"
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    buckets: str | None = None
    kind = "images"

    def describe(self) -> dict:
        files = self._files()
        out = {"kind": self.kind, "folder": str(Path(self.folder).resolve()), "resolution": self.resolution,
               "vae": self.vae if self.vae == "none" else str(Path(self.vae).resolve()), "seed": self.seed,
               "files": len(files), "stamp": files_stamp(files)}
        if self.buckets is not None:  # the buckets decide the sizes: resolution is not used
            out["buckets"] = self.buckets
            del out["resolution"]
        return out

    def _files(self) -> list[Path]:
        root = Path(self.folder)
        if not root.is_dir():
            raise DatasetError(f"input folder {self.folder!r} does not exist")
        return sorted(p for p in root.glob("*/*") if p.is_file())

    def plan(self) -> Plan:
        root = Path(self.folder)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise DatasetError(f"image folder {self.folder!r} has no class subfolders (expected <folder>/<class>/*.png)")
        items = []
        for p in self._files():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                log.warning("skipping %s: not an image file (suffix %r)", p, p.suffix)
                continue
            items.append((p.relative_to(root).as_posix(), classes.index(p.parent.name)))
        if not items:
            raise DatasetError(f"image folder {self.folder!r} holds no images in its class subfolders {classes}")
        if self.buckets is None:
            return Plan(items, num_classes=len(classes), class_names=classes, **vae_plan(self.vae, self.resolution))
        layout = plan_buckets([root / rel for rel, _ in items], self.buckets, self.vae)
        return Plan([(*items[j], b, orig, crop) for j, b, orig, crop in layout.order], num_classes=len(classes),
                    class_names=classes, **layout.plan)

    def load(self, items: Sequence[tuple[str, int]], plan: Plan) -> Iterator[Sample]:
        root = Path(self.folder)
        encoder = ImageEncoder(self.vae, self.device, self.seed)
        owned = dict(items)

        def path_of(i: int) -> Path:
            return root / plan.items[i][0]

        bucketed = plan.buckets is not None
        for chunk, latents, readable in encode_image_chunks(
                list(owned), len(plan.items), self.batch_size, path_of, self.resolution, encoder,
                pixels_of=bucketed_item_loader(plan, path_of) if bucketed else None, starts=bucket_starts(plan)):
            for i, latent, ok in zip(chunk, latents, readable):
                if ok and i in owned:
                    rel, label = owned[i][:2]
                    if not bucketed:
                        check_sample(latent, label, plan, str(root / rel))
                        yield Sample(i, latent, label)
                        continue
                    bucket, orig, crop = owned[i][2:]
                    check_sample(latent, label, plan, str(root / rel), shape=plan.buckets[bucket]["latent_shape"])
                    yield Sample(i, latent, label, orig_size=tuple(orig), crop_box=tuple(crop))
