"""The facts of a latent dataset, stored beside its shards and checked against the model config."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from tread_scale.data.object_store import join_uri, read_bytes
from tread_scale.errors import DatasetError, DatasetMismatchError

META_FILE = "tread_meta.json"
FORMAT = "tread-latents/1"


@dataclass
class LatentMetadata:
    """Metadata record of a converted dataset.

    Attributes:
        latent_shape: ``(C, H, W)`` of every sample.
        dtype: Stored dtype of the ``latent`` column.
        num_classes: Number of classes; labels are ``0..num_classes-1``.
        num_samples: Samples in the dataset.
        vae: Identifier of the VAE that produced the latents, or ``none`` for pixel space.
        scaling_factor: Factor the latents were multiplied by (decode divides by it); 1 for pixel space.
        class_names: Optional names of the classes, by label.
        source: What the data was converted from.
    """

    latent_shape: tuple[int, int, int]
    num_classes: int
    num_samples: int
    dtype: str = "float16"
    vae: str = "none"
    scaling_factor: float = 1.0
    class_names: list[str] | None = None
    source: str = ""
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> LatentMetadata:
        try:
            d = json.loads(text)
            d["latent_shape"] = tuple(int(x) for x in d["latent_shape"])
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{where}: malformed dataset metadata ({type(e).__name__}: {e})") from None


def read_metadata(root: str) -> LatentMetadata:
    """Read ``tread_meta.json`` from a dataset root (local folder or s3:// prefix).

    Raises:
        DatasetError: If it is missing or malformed (the message names the file).
    """
    where = join_uri(root, META_FILE)
    raw = read_bytes(where)
    if raw is None:
        raise DatasetError(f"{where} not found: {root} is not a dataset written by `tread-scale convert` "
                           "(or its conversion did not finish)")
    return LatentMetadata.from_json(raw, where)


def parse_ndarray_encoding(encoding: str) -> tuple[str, tuple[int, ...] | None]:
    """``ndarray:float16:4,32,32`` → ``("float16", (4, 32, 32))``; shape ``None`` when not static."""
    m = re.fullmatch(r"ndarray(?::(\w+))?(?::([\d,]+))?", encoding)
    if not m:
        raise DatasetError(f"column encoding {encoding!r} is not an MDS ndarray encoding")
    shape = tuple(int(x) for x in m.group(2).split(",")) if m.group(2) else None
    return m.group(1) or "unknown", shape


def check_against_model(meta: LatentMetadata, *, in_channels: int, input_size: int, num_classes: int,
                        where: str) -> None:
    """Check the dataset's facts against the model config.

    Raises:
        DatasetMismatchError: Naming the dataset, the field and both values.
    """
    expected = (in_channels, input_size, input_size)
    if tuple(meta.latent_shape) != expected:
        raise DatasetMismatchError(
            f"{where}: latents have shape {tuple(meta.latent_shape)} (C, H, W) but the model expects {expected} "
            f"(model.in_channels={in_channels}, model.input_size={input_size})"
        )
    if meta.dtype not in ("float16", "float32", "bfloat16"):
        raise DatasetMismatchError(f"{where}: latent dtype {meta.dtype!r} is not a float type")
    if meta.num_classes > num_classes:
        raise DatasetMismatchError(
            f"{where}: dataset has {meta.num_classes} classes but model.num_classes={num_classes}; "
            "labels would be out of range"
        )
