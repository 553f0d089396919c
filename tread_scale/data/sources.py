"""Inputs that ``tread-scale convert`` turns into MDS shards.

A source is a small picklable description. :meth:`Source.plan` lists the work in the parent process
(raising early for an empty folder or unlabelled files); :meth:`Source.load` turns a slice of that list into
samples inside a worker process.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tread_scale.data.demo import DEMO_NUM_CLASSES, DEMO_NUM_SAMPLES, DEMO_RESOLUTION
from tread_scale.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    """One converted sample: a float latent ``(C, H, W)``, its label and a stable id."""

    id: int
    latent: np.ndarray
    label: int


@dataclass
class Plan:
    """What a source will produce: the work items and the facts of the data."""

    items: list[Any]
    latent_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str] | None = None
    vae: str = "none"
    scaling_factor: float = 1.0


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


def check_sample(latent: np.ndarray, label: int, plan: Plan, where: str) -> None:
    """Raise :class:`DatasetError` naming ``where`` for a wrong shape, non-finite values or a bad label."""
    if tuple(latent.shape) != tuple(plan.latent_shape):
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


# --------------------------------------------------------------------------- demo
@dataclass
class DemoSource(Source):
    """The built-in procedural shapes (:mod:`tread_scale.data.demo`), in pixel space.

    The defaults (4096 samples of 3x16x16, 6 classes) fit ``yamls/demo.yaml``'s model.
    """

    num_samples: int = DEMO_NUM_SAMPLES
    resolution: int = DEMO_RESOLUTION
    seed: int = 0
    num_classes: int = DEMO_NUM_CLASSES
    kind = "demo"

    def describe(self) -> dict:
        return {"kind": self.kind, "num_samples": self.num_samples, "resolution": self.resolution,
                "seed": self.seed, "num_classes": self.num_classes}

    def plan(self) -> Plan:
        from tread_scale.data.demo import DEMO_CLASSES

        if self.num_samples < 1:
            raise DatasetError(f"demo: num_samples must be >= 1, got {self.num_samples}")
        names = [n for n, _ in DEMO_CLASSES[: self.num_classes]]
        return Plan(list(range(self.num_samples)), (3, self.resolution, self.resolution), self.num_classes, names)

    def load(self, items: Sequence[tuple[int, int]], plan: Plan) -> Iterator[Sample]:
        from tread_scale.data.demo import demo_image

        for item_id, index in items:
            img, label = demo_image(index, self.resolution, self.seed, self.num_classes)
            yield Sample(item_id, img, label)


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
        batch_size: Images per VAE forward.
        seed: Seed of the latent sampling (``latent_dist.sample``).
        device: Device for encoding.
    """

    folder: str = ""
    resolution: int = 256
    vae: str = "none"
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    kind = "images"

    def describe(self) -> dict:
        files = self._files()
        return {"kind": self.kind, "folder": str(Path(self.folder).resolve()), "resolution": self.resolution,
                "vae": self.vae if self.vae == "none" else str(Path(self.vae).resolve()), "seed": self.seed,
                "files": len(files), "stamp": files_stamp(files)}

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
        if self.vae == "none":
            return Plan(items, (3, self.resolution, self.resolution), len(classes), classes)
        from tread_scale.data.vae import load_vae, vae_downsample, vae_scaling_factor

        vae = load_vae(self.vae)
        f = vae_downsample(vae)
        if self.resolution % f:
            raise DatasetError(f"resolution {self.resolution} is not divisible by the VAE's downsampling factor {f}")
        shape = (int(vae.config.latent_channels), self.resolution // f, self.resolution // f)
        vae_id = str(getattr(vae.config, "_name_or_path", "") or Path(self.vae).name)
        return Plan(items, shape, len(classes), classes, vae=vae_id, scaling_factor=vae_scaling_factor(vae))

    def load(self, items: Sequence[tuple[str, int]], plan: Plan) -> Iterator[Sample]:
        import torch

        root = Path(self.folder)
        vae = None
        if self.vae != "none":
            from tread_scale.data.vae import encode, load_vae

            vae = load_vae(self.vae, self.device)
        batch: list[tuple[int, np.ndarray, int]] = []

        def flush() -> Iterator[Sample]:
            if not batch:
                return
            pixels = np.stack([b[1] for b in batch])
            if vae is None:
                latents = pixels
            else:
                from tread_scale.rng import mix_seed

                gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, batch[0][0]))
                latents = encode(vae, torch.from_numpy(pixels).to(self.device), generator=gen).cpu().numpy()
            for (item_id, _, label), latent in zip(batch, latents):
                check_sample(latent, label, plan, str(root / items_by_id[item_id][0]))
                yield Sample(item_id, latent, label)
            batch.clear()

        items_by_id = dict(items)
        for item_id, (rel, label) in items:
            try:
                pixels = _load_image(root / rel, self.resolution)
            except (OSError, ValueError) as e:
                log.warning("skipping %s: cannot be read as an image (%s)", root / rel, e)
                continue
            batch.append((item_id, pixels, label))
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()
