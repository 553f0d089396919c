"""EMA weight files: safetensors plus the config needed to rebuild the network.

Only safetensors are loaded: no pickled code is ever executed when sampling or exporting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tread_scale.errors import CheckpointError
from tread_scale.files import replace_atomically

if TYPE_CHECKING:
    from tread_scale.config import ModelConfig, RoutingConfig, RunConfig
    from tread_scale.data.metadata import LatentMetadata

META_KEY = "tread_scale"


@dataclass
class DataFacts:
    """What a weight file records about the data its network was trained on.

    Attributes:
        latent_shape: ``[C, H, W]`` of the network's input.
        num_classes: Labels are ``0..num_classes-1``.
        vae: Identifier of the VAE whose latents the network models, or ``none`` for pixel space.
        scaling_factor: Factor the latents were multiplied by (``None`` when not recorded).
        class_names: Names of the classes, by label, if known.
        text: A captioned dataset's ``text`` section (:class:`~tread_scale.data.metadata.TextMetadata` as a
            mapping: encoders with their content hashes, ``seq_len``, widths, ``max_length``); ``None`` for
            data without captions (and then left out of the file).
    """

    latent_shape: list[int]
    num_classes: int
    vae: str = "none"
    scaling_factor: float | None = None
    class_names: list[str] | None = None
    text: dict[str, Any] | None = None

    def text_metadata(self):
        """The recorded ``text`` section as a :class:`~tread_scale.data.metadata.TextMetadata`, or ``None``."""
        from tread_scale.data.metadata import TextMetadata

        if self.text is None:
            return None
        known = {f.name for f in dataclasses.fields(TextMetadata)}
        return TextMetadata(**{k: v for k, v in self.text.items() if k in known})


@dataclass
class WeightsMeta:
    """The metadata stored with exported weights: enough to rebuild and sample the network on its own.

    ``model``, ``routing`` and ``objective`` are the config sections as plain mappings (what
    :func:`tread_scale.config.to_dict` gives); :meth:`model_config` and :meth:`routing_config` type them.
    Optional fields that are ``None`` are left out of :meth:`to_dict`, and keys this class does not know
    are kept in ``extra``, so a file's metadata survives a round trip.

    Attributes:
        model: The ``model`` config section.
        objective: The ``objective`` config section (``kind``, ``sigma_data``, ...).
        data: Facts of the training data.
        routing: The ``routing`` config section (``routes``, ``seed``); empty means dense.
        run_name: The training run that wrote the file.
        source: Where imported weights came from (e.g. a facebookresearch/DiT checkpoint).
        step: Training batch the weights are from.
        ema: Whether these are EMA weights (``False``: raw weights of a run without EMA).
        text: The run's ``text`` section (``t5``/``clip``: local encoder folders, absolute paths) of a
            text-conditioned model, so ``tread-scale sample --prompt`` finds its encoders; ``None`` otherwise.
        train_wall_s: Wall-clock seconds up to ``step`` (Composer's ``timestamp.total_wct``: the sum of batch
            times, continued across resumes; our in-training evaluation runs between batches and is counted in
            the next batch's time: ``metrics.jsonl``'s ``train_wall_s`` excludes it); ``None`` if not recorded
            (files exported before it was).
        extra: Other keys, kept as they are.
    """

    model: dict[str, Any]
    objective: dict[str, Any]
    data: DataFacts
    routing: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    source: str | None = None
    step: int | None = None
    ema: bool | None = None
    text: dict[str, str | None] | None = None
    train_wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = ("run_name", "source", "step", "ema", "text", "train_wall_s")

    @classmethod
    def from_run(cls, cfg: RunConfig, data: LatentMetadata) -> WeightsMeta:
        """The metadata of weights trained by the run ``cfg`` on the dataset described by ``data``."""
        from tread_scale.config import to_dict

        text_model = cfg.model.model_family() == "mmdit" and data.text is not None
        encoders = {k: str(Path(v).resolve()) if v else None for k, v in to_dict(cfg.text).items()}
        return cls(model=to_dict(cfg.model), routing=to_dict(cfg.routing), objective=to_dict(cfg.objective),
                   data=DataFacts(latent_shape=list(data.latent_shape), num_classes=data.num_classes, vae=data.vae,
                                  scaling_factor=data.scaling_factor, class_names=data.class_names,
                                  text=dataclasses.asdict(data.text) if text_model else None),
                   run_name=cfg.run_name, text=encoders if text_model else None)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], where: str = "weights") -> WeightsMeta:
        """Parse the JSON mapping stored in a weight file.

        Args:
            meta: The mapping (as :func:`load_weights` returns it).
            where: The file, named in errors.

        Raises:
            CheckpointError: If ``model``, ``objective``, ``data`` or the data's ``latent_shape`` or
                ``num_classes`` is missing.
        """
        missing = [k for k in ("model", "objective", "data") if k not in meta]
        data = meta.get("data") or {}
        missing += [f"data.{k}" for k in ("latent_shape", "num_classes") if "data" in meta and k not in data]
        if missing:
            raise CheckpointError(f"{where}: the weights' metadata lacks {', '.join(missing)} (not written by "
                                  "tread_scale, or damaged)")
        facts = DataFacts(latent_shape=[int(v) for v in data["latent_shape"]], num_classes=int(data["num_classes"]),
                          vae=data.get("vae", "none"), scaling_factor=data.get("scaling_factor"),
                          class_names=data.get("class_names"), text=data.get("text"))
        known = {"model", "objective", "data", "routing", *cls._OPTIONAL}
        return cls(model=dict(meta["model"]), objective=dict(meta["objective"]), data=facts,
                   routing=dict(meta.get("routing") or {}), extra={k: v for k, v in meta.items() if k not in known},
                   **{k: meta.get(k) for k in cls._OPTIONAL})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able mapping stored in the file (the inverse of :meth:`from_dict`)."""
        out: dict[str, Any] = {**self.extra, "model": self.model, "routing": self.routing,
                               "objective": self.objective, "data": dataclasses.asdict(self.data)}
        if self.data.text is None:
            del out["data"]["text"]  # files of class-conditional models keep exactly their former metadata
        out.update({k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None})
        return out

    def at_step(self, step: int, ema: bool, train_wall_s: float | None = None) -> WeightsMeta:
        """A copy for the weights of batch ``step`` (``ema``: whether they are EMA weights), trained for
        ``train_wall_s`` wall-clock seconds."""
        return dataclasses.replace(self, step=step, ema=ema, train_wall_s=train_wall_s)

    @property
    def objective_kind(self) -> str:
        """``edm`` or ``rf``."""
        return str(self.objective["kind"])

    @property
    def shift(self) -> float:
        """Rectified flow's timestep shift (1, none, when not recorded)."""
        return float(self.objective.get("shift", 1.0))

    @property
    def sigma_data(self) -> float:
        """σ_data of the EDM objective (0.5 when not recorded)."""
        return float(self.objective.get("sigma_data", 0.5))

    @property
    def num_classes(self) -> int:
        """Number of classes of the training data."""
        return self.data.num_classes

    def model_config(self) -> ModelConfig:
        """The recorded ``model`` section as a :class:`~tread_scale.config.ModelConfig`.

        Raises:
            ConfigError: If the recorded section does not fit the schema.
        """
        from tread_scale.config import ModelConfig, from_dict

        # weights written before model.timestep_scale existed fed t unscaled
        return from_dict(ModelConfig, {"timestep_scale": 1.0, **self.model}, "model")

    def routing_config(self) -> RoutingConfig:
        """The recorded ``routing`` section as a :class:`~tread_scale.config.RoutingConfig`."""
        from tread_scale.config import RoutingConfig, from_dict

        return from_dict(RoutingConfig, self.routing, "routing")


def resolve_weights(path: str | os.PathLike) -> Path:
    """A weights file as given, or ``<run>/ema/latest.safetensors`` for a run folder.

    Raises:
        CheckpointError: If ``path`` is a folder without ``ema/latest.safetensors``.
    """
    p = Path(path)
    if p.is_dir():
        candidate = p / "ema" / "latest.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"{p} is a folder without ema/latest.safetensors (not a finished training run)")
        return candidate
    return p


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 meta: WeightsMeta | Mapping[str, Any]) -> Path:
    """Write ``state_dict`` (contiguous CPU copies) and ``meta`` (JSON) to a safetensors file, atomically.

    The file gets the mode of any new file (``0o666 & ~umask``), as :class:`SafetensorsWriter`'s do.

    Args:
        path: The ``.safetensors`` file.
        state_dict: The tensors.
        meta: A :class:`WeightsMeta` (or its :meth:`~WeightsMeta.to_dict` mapping).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    raw = meta.to_dict() if isinstance(meta, WeightsMeta) else dict(meta)
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(raw, sort_keys=True)})
    return replace_atomically(tmp, path)  # safetensors creates its file 0600; give it the usual mode


#: safetensors' dtype codes (its header's ``dtype`` field).
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}

TensorSpecs = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def safetensors_order(specs: TensorSpecs) -> list[str]:
    """The order in which safetensors' own writer lays out tensors of these names and dtypes.

    It sorts by dtype and then by name; rather than restate its dtype ranking, the order is read back from
    the header it writes for one-element tensors of the same names and dtypes.
    """
    from safetensors.torch import save

    blob = save({n: torch.zeros(1, dtype=dtype) for n, (dtype, _) in specs.items()})
    size = int.from_bytes(blob[:8], "little")
    return [k for k in json.loads(blob[8: 8 + size]) if k != "__metadata__"]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, byte-identical to ``safetensors.torch.save_file``.

    The header (names, dtypes, shapes, offsets, metadata) is known from ``specs`` before any data, so each
    tensor goes to the file as it arrives and the writer never holds more than the one being written. It
    writes ``<path>.tmp`` and renames it to ``path`` on :meth:`close` (removed if the ``with`` block fails).

    Args:
        path: The ``.safetensors`` file.
        specs: Name → (dtype, shape) of every tensor the file will hold.
        metadata: The header's string metadata (``__metadata__``), if any.

    Attributes:
        order: The names in the order :meth:`write` expects them (safetensors' own layout).
    """

    def __init__(self, path: str | os.PathLike, specs: TensorSpecs, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = {n: (dtype, tuple(int(d) for d in shape)) for n, (dtype, shape) in specs.items()}
        unknown = sorted({str(dtype) for dtype, _ in self.specs.values() if dtype not in _SAFETENSORS_DTYPES})
        if unknown:
            raise CheckpointError(f"{self.path}: cannot stream tensors of dtype {', '.join(unknown)}")
        self.order = safetensors_order(self.specs)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name in self.order:
            dtype, shape = self.specs[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        # safetensors writes compact JSON, UTF-8 unescaped, padded with spaces to a multiple of 8 bytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._next = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next name of :attr:`order`, with the dtype and shape given."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing more"
            raise CheckpointError(f"{self.path}: got tensor {name!r}, expected {expected!r}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"the header says {dtype} {shape}")
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> Path:
        """Finish the file (all tensors must have been written) and move it into place."""
        self._file.close()
        if self._next != len(self.order):
            self._tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{self.path}: {len(self.order) - self._next} tensors were never written "
                                  f"(first: {self.order[self._next]!r})")
        return replace_atomically(self._tmp, self.path)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def save_weights_streaming(path: str | os.PathLike, specs: TensorSpecs,
                           tensors: Iterable[tuple[str, torch.Tensor]], meta: WeightsMeta | Mapping[str, Any]) -> Path:
    """:func:`save_weights` for tensors that arrive one at a time, in :func:`safetensors_order` of ``specs``.

    The file is byte-identical to what :func:`save_weights` writes for the same tensors and ``meta``.
    """
    raw = meta.to_dict() if isinstance(meta, WeightsMeta) else dict(meta)
    with SafetensorsWriter(path, specs, {META_KEY: json.dumps(raw, sort_keys=True)}) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor)
    return writer.path


def _checked_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if it is an existing ``.safetensors`` file.

    Raises:
        CheckpointError: If the file is missing or not safetensors (pickles are refused).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {str(p)!r} does not exist")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: only .safetensors weight files are loaded (pickled .pt/.ckpt files can run "
                              "arbitrary code); export EMA weights with the training run's ema/ folder")
    return p


def read_header_json(p: Path, key: str = META_KEY, missing: str = "it was not written by tread_scale") -> Any:
    """The JSON stored under ``key`` in the header metadata of the safetensors file ``p``.

    Args:
        p: The file.
        key: The metadata key (``tread_scale_meta`` for weights files).
        missing: What the error says after "no '<key>' metadata; " when the key is absent.

    Raises:
        CheckpointError: If the file is unreadable or lacks the metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    if raw_meta is None:
        raise CheckpointError(f"{p}: no '{key}' metadata; {missing}")
    return json.loads(raw_meta)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights`.

    Returns:
        ``(tensors, metadata)``, the metadata as the stored mapping (see :func:`load_weights_and_meta`).

    Raises:
        CheckpointError: If the file is missing, not safetensors (pickles are refused) or lacks the metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = _checked_path(path)
    meta = read_header_json(p)
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    return tensors, meta


def read_meta(path: str | os.PathLike) -> WeightsMeta:
    """The metadata of a file written by :func:`save_weights`, reading only its header (not the tensors).

    Raises:
        CheckpointError: As :func:`load_weights_and_meta`.
    """
    p = _checked_path(path)
    return WeightsMeta.from_dict(read_header_json(p), str(p))


def load_weights_and_meta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], WeightsMeta]:
    """:func:`load_weights` with the metadata parsed into a :class:`WeightsMeta`.

    Raises:
        CheckpointError: As :func:`load_weights`, or if the metadata lacks what rebuilding the network needs.
    """
    tensors, raw = load_weights(path)
    return tensors, WeightsMeta.from_dict(raw, str(path))
