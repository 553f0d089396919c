"""Samples in GenEval's folder layout, to be scored elsewhere (``tread-scale sample --geneval``).

GenEval (github.com/djghosh13/geneval) scores a text-to-image model with an object detector and CLIP, in an
environment of its own (mmdet and its detector weights do not belong in a training environment). Its
prompts are ``prompts/evaluation_metadata.jsonl``, one JSON object a line, each with its ``prompt`` and what
the detector must find (``tag``, ``include``, ...). Its ``evaluation/evaluate_images.py`` reads::

    <out>/<index:05d>/metadata.jsonl     that prompt's JSON object, one line
    <out>/<index:05d>/samples/<k:04d>.png   image k = 0..N-1 of the prompt (GenEval uses N = 4)

(subfolders whose names are not all digits, and files not named ``<digits>.png``, are skipped). Beside the
prompt folders, ``<out>/tread_scale.json`` records what made the images (weights and their SHA-256, the
metadata file and its SHA-256, seed, sampler, steps, guidance, images per prompt, batch size, VAE,
encoders), so a score can be traced back to them.

Image ``k`` of prompt ``p`` (0-based, in file order) uses seed ``seed + p * per_prompt + k``: the images
equal those of ``tread-scale sample --prompts`` given each prompt ``per_prompt`` times in a row, with the
same seed and batch size. Every file is written under a hidden temporary name and renamed, so a killed run
leaves no half-written PNG; a run started again on the same folder with the same settings skips the
prompts whose folders hold all their images (the seeds do not depend on which prompts are left).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tread_scale.errors import ConfigError
from tread_scale.files import replace_atomically
from tread_scale.jsonl import json_objects

log = logging.getLogger(__name__)

#: The run record beside the prompt folders (its name is not all digits: GenEval skips it).
RECORD_FILE = "tread_scale.json"
#: Each prompt folder's copy of its metadata line.
METADATA_FILE = "metadata.jsonl"
#: Each prompt folder's image folder.
SAMPLES_DIR = "samples"
#: Images per prompt of GenEval's protocol.
GENEVAL_IMAGES_PER_PROMPT = 4
#: Keys of the run record that decide the images: a resumed run must agree on all of them.
RECORD_KEYS = ("weights_sha256", "metadata_sha256", "num_prompts", "images_per_prompt", "seed", "objective", "steps",
               "guidance", "vae", "batch_size")


def read_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """The prompts of a GenEval metadata file (``evaluation_metadata.jsonl``): one JSON object a line.

    Blank lines are skipped; prompt ``p`` is the ``p``-th object. Every object must hold a non-empty string
    ``prompt``; its other keys (``tag``, ``include``, ``exclude``, ...) are kept as they are, for GenEval.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The objects, in file order.

    Raises:
        ConfigError: If the file is missing or holds no object, or naming the file and line of a line that is
            not a JSON object with a non-empty string ``prompt``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--geneval {str(path)!r}: no such file (GenEval's prompts/evaluation_metadata.jsonl: one "
                          "JSON object a line)")
    out = []
    for where, obj in json_objects(p, ConfigError, 'a JSON object with a "prompt"',
                                   '{"tag": "single_object", "prompt": "a photo of a bench", ...}'):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            got = "no \"prompt\" key" if "prompt" not in obj else f"\"prompt\": {json.dumps(prompt)}"
            raise ConfigError(f"{where}: expected a non-empty string \"prompt\", got {got}")
        out.append(obj)
    if not out:
        raise ConfigError(f"--geneval {str(path)!r}: the file holds no prompt (one JSON object a line)")
    return out


def prompt_folder(out: str | os.PathLike, index: int) -> Path:
    """The folder of prompt ``index``: ``<out>/<index:05d>``."""
    return Path(out) / f"{index:05d}"


def sample_file(out: str | os.PathLike, index: int, k: int) -> Path:
    """Image ``k`` of prompt ``index``: ``<out>/<index:05d>/samples/<k:04d>.png``."""
    return prompt_folder(out, index) / SAMPLES_DIR / f"{k:04d}.png"


def is_complete(out: str | os.PathLike, index: int, per_prompt: int) -> bool:
    """Whether prompt ``index``'s folder holds its ``metadata.jsonl`` and all ``per_prompt`` images."""
    return (prompt_folder(out, index) / METADATA_FILE).is_file() and all(
        sample_file(out, index, k).is_file() for k in range(per_prompt))


def _write_atomically(path: Path, write) -> Path:
    """Write ``path`` through a hidden temporary file beside it (``.<name>.tmp``, which GenEval never reads:
    it takes ``<digits>.png`` only), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        return replace_atomically(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    return _write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _write_text(path: Path, text: str) -> Path:
    return _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_geneval_layout(metadata: Sequence[Mapping[str, Any]],
                         images: Mapping[int, np.ndarray] | Sequence[np.ndarray], out: str | os.PathLike) -> list[Path]:
    """Write prompts' images in GenEval's layout: ``<out>/<p:05d>/metadata.jsonl`` and ``samples/<k:04d>.png``.

    Each file goes in under a hidden temporary name and is renamed (no half-written PNG after a kill):
    ``metadata.jsonl`` first, then the images, so a folder is complete exactly when all its images are there
    (:func:`is_complete`).

    Args:
        metadata: Every prompt's object (:func:`read_geneval_metadata`); ``metadata.jsonl`` holds it on one line.
        images: Prompt number → its images, ``(N, H, W, 3)`` uint8 (a sequence: prompts ``0..len-1``).
        out: The output folder (created).

    Returns:
        The prompt folders written.

    Raises:
        ValueError: If a prompt number is outside ``metadata`` or its images are not ``(N, H, W, 3)`` uint8.
    """
    items = images.items() if isinstance(images, Mapping) else enumerate(images)
    written = []
    for p, imgs in items:
        if not 0 <= p < len(metadata):
            raise ValueError(f"prompt {p} is outside the {len(metadata)} prompts of the metadata")
        imgs = np.asarray(imgs)
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3 or not len(imgs):
            raise ValueError(f"prompt {p}: expected its images as (N, H, W, 3) uint8, got {imgs.shape} {imgs.dtype}")
        folder = prompt_folder(out, p)
        _write_text(folder / METADATA_FILE, json.dumps(dict(metadata[p])) + "\n")
        for k, img in enumerate(imgs):
            _write_png(sample_file(out, p, k), np.ascontiguousarray(img))
        written.append(folder)
    return written


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_run_record(out: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``<out>/tread_scale.json`` (atomically): what made the images of the folder."""
    return _write_text(Path(out) / RECORD_FILE, json.dumps(dict(record), indent=2) + "\n")


def check_run_record(out: str | os.PathLike, record: Mapping[str, Any]) -> bool:
    """Whether ``out`` already holds a run record, checked against ``record`` (a resumed run).

    Returns:
        ``True`` if ``<out>/tread_scale.json`` exists and agrees on :data:`RECORD_KEYS`; ``False`` if there
        is none (a new folder, or one without a record: then no prompt folder may be there).

    Raises:
        ConfigError: If the record differs on a key that decides the images (naming the keys and both
            values), cannot be read, or prompt folders lie in ``out`` without a record.
    """
    path = Path(out) / RECORD_FILE
    if not path.is_file():
        strays = sorted(q.name for q in Path(out).glob("[0-9]" * 5) if q.is_dir()) if Path(out).is_dir() else []
        if strays:
            raise ConfigError(f"--out {str(out)!r} holds prompt folders ({', '.join(strays[:3])}, ...) but no "
                              f"{RECORD_FILE}: not written by this command, so they cannot be resumed; use another "
                              "--out")
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); remove the folder or use another --out") from None
    new = json.loads(json.dumps(dict(record)))  # tuples as lists, as read back
    differ = [k for k in RECORD_KEYS if old.get(k) != new.get(k)]
    if differ:
        what = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in differ)
        raise ConfigError(f"{path}: --out holds samples of other settings ({what}); resuming would mix them: use "
                          "another --out, or the same settings")
    return True


def sample_geneval(weights: str, metadata_file: str, out: str, *, per_prompt: int = GENEVAL_IMAGES_PER_PROMPT,
                   seed: int = 0, t5: str | None = None, clip: str | None = None, clip_l: str | None = None,
                   clip_g: str | None = None, steps: int | None = None, guidance=None, vae: str | None = None,
                   batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Sample ``per_prompt`` images of every prompt of a GenEval metadata file into GenEval's layout (rank 0 writes).

    Image ``k`` of prompt ``p`` uses seed ``seed + p * per_prompt + k``. Prompts are sampled in runs of
    consecutive prompts (about ``batch_size`` × world size images each), every rank generating its share
    (``rank, rank + W, ...`` of a run, as :func:`~tread_scale.sampling.generate.generate` does); rank 0 writes
    each run's folders as soon as it is done. Prompts whose folders hold all their images already (a run
    started again with the same settings, checked against ``tread_scale.json``) are skipped.

    Args:
        weights: A text-to-image MMDiT's ``.safetensors`` file, or a run folder.
        metadata_file: GenEval's ``evaluation_metadata.jsonl`` (or another file of the same form).
        out: The output folder.
        per_prompt: Images per prompt (GenEval: 4).
        seed: Seed of image 0 of prompt 0.
        t5: Local T5 encoder folder (default: the one recorded with the weights).
        clip: Local CLIP encoder folder (default: as recorded).
        clip_l: Local CLIP-L folder, SD3's layout (default: as recorded).
        clip_g: Local CLIP-G folder, SD3's layout (default: as recorded).
        steps: Sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler).
        guidance: CFG / TREAD guidance, or ``None``.
        vae: Local VAE folder to decode latents, or ``None``.
        batch_size: Samples per forward pass (capped to prompts × ``per_prompt``); keep it fixed to compare runs.
        device: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``cuda:N``.

    Returns:
        On rank 0: ``record`` (path of ``tread_scale.json``), ``prompts``, ``skipped`` and ``written`` (prompt
        counts); empty on other ranks.

    Raises:
        ConfigError: If the metadata file is bad, the weights are not a text-to-image MMDiT, ``per_prompt`` or
            ``batch_size`` < 1, ``out`` holds samples of other settings, or the encoders do not match.
        CheckpointError: If the weights cannot be loaded.
    """
    from tread_scale.devices import resolve_device
    from tread_scale.sampling.folder import encode_for_weights
    from tread_scale.sampling.generate import world
    from tread_scale.sampling.settings import default_steps
    from tread_scale.weights import read_meta, resolve_weights

    if per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {per_prompt}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    metadata = read_geneval_metadata(metadata_file)
    path = resolve_weights(weights)
    meta = read_meta(path)
    if meta.model_config().model_family() != "mmdit":
        raise ConfigError(f"--geneval: {path} holds a class-conditional DiT ({meta.num_classes} classes), which takes "
                          "no text; GenEval scores text-to-image (MMDiT) weights")
    if guidance is not None:
        guidance.validate()
    steps = steps or default_steps(meta.objective_kind)
    batch = min(batch_size, len(metadata) * per_prompt)  # of all the images: the same when a run is resumed
    if batch < batch_size:
        log.info("--batch-size %d > the %d images of %d prompts: batches of %d", batch_size,
                 len(metadata) * per_prompt, len(metadata), batch)
    rank, world_size = world()
    encoders = {"t5": t5, "clip": clip, "clip_l": clip_l, "clip_g": clip_g}
    recorded = meta.text or {}
    record = {
        "layout": "geneval", "tool": _tool(), "weights": str(path.resolve()), "run_name": meta.run_name,
        "step": meta.step, "metadata": str(Path(metadata_file).resolve()), "num_prompts": len(metadata),
        "images_per_prompt": per_prompt, "seed": seed, "seed_rule": "image k of prompt p: seed + p * "
        "images_per_prompt + k", "objective": meta.objective_kind, "steps": steps,
        "guidance": dataclasses.asdict(guidance) if guidance is not None else None,
        "vae": str(Path(vae).resolve()) if vae else None, "batch_size": batch,
        "latent_shape": list(meta.data.latent_shape),
        "encoders": {k: v or recorded.get(k) for k, v in encoders.items() if v or recorded.get(k)},
    }
    plan: dict[str, Any] = {}
    if rank == 0:
        try:
            record["weights_sha256"] = file_sha256(path)
            record["metadata_sha256"] = file_sha256(metadata_file)
            resumed = check_run_record(out, record)
            pending = [p for p in range(len(metadata)) if not (resumed and is_complete(out, p, per_prompt))]
            plan = {"pending": pending, "resumed": resumed}
        except ConfigError as e:
            plan = {"error": str(e)}
    plan = _broadcast(plan, world_size)
    if "error" in plan:
        raise ConfigError(plan["error"])
    pending = plan["pending"]
    skipped = len(metadata) - len(pending)
    if skipped:
        log.info("%d of %d prompts already hold their %d images in %s: skipped", skipped, len(metadata), per_prompt,
                 out)
    result = {"record": Path(out) / RECORD_FILE, "prompts": len(metadata), "skipped": skipped, "written": 0}
    if not pending:
        log.info("nothing left to sample: all %d prompts are done", len(metadata))
        return result if rank == 0 else {}

    dev = resolve_device(device)
    prompt_set = encode_for_weights(meta, path, [metadata[p]["prompt"] for p in pending], encoders, dev)
    if rank == 0 and not plan["resumed"]:
        write_run_record(out, record)  # a resumed run keeps the record of the run it continues (the same keys)
    runs = prompt_runs(pending, max(1, batch * world_size // per_prompt))
    done = 0
    for run in _generate_runs(path, meta, prompt_set, pending, runs, per_prompt=per_prompt, seed=seed, steps=steps,
                              guidance=guidance, vae=vae, batch=batch, dev=dev):
        if rank == 0:
            write_geneval_layout(metadata, run, out)
            done += len(run)
            log.info("GenEval layout: %d of %d prompts written (%s)", skipped + done, len(metadata), out)
    if rank != 0:
        return {}
    return {**result, "written": done}


def prompt_runs(pending: Sequence[int], size: int) -> list[list[int]]:
    """``pending`` prompt numbers cut into runs of at most ``size`` consecutive numbers.

    >>> prompt_runs([0, 1, 2, 3, 7, 8, 10], 3)
    [[0, 1, 2], [3], [7, 8], [10]]
    """
    runs: list[list[int]] = []
    for p in pending:
        if runs and p == runs[-1][-1] + 1 and len(runs[-1]) < size:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _generate_runs(path, meta, prompt_set, pending, runs, *, per_prompt, seed, steps, guidance, vae, batch, dev):
    """Yield, for each run of consecutive prompts, prompt number → its ``(per_prompt, H, W, 3)`` uint8 images
    (on rank 0; other ranks get empty mappings after they did their share)."""
    from tread_scale.sampling.generate import generate, rank_indices, rows_on_rank0, world
    from tread_scale.sampling.loading import load_net, make_decoder
    from tread_scale.sampling.prompts import PromptSet
    from tread_scale.sampling.settings import SamplerSettings

    rank, world_size = world()
    net, meta = load_net(path, dev)
    settings = SamplerSettings(meta.objective_kind, steps, sigma_data=meta.sigma_data, shift=meta.shift)
    decode = make_decoder(vae, meta.data.vae, dev)
    row_of = {p: j for j, p in enumerate(pending)}
    for run in runs:
        # image k of the run's q-th prompt is the run's sample q * per_prompt + k, with seed
        # seed + run[0] * per_prompt + q * per_prompt + k = seed + (run[0] + q) * per_prompt + k (a run is consecutive)
        rows = [row_of[p] for p in run for _ in range(per_prompt)]
        repeated = PromptSet([prompt_set.prompts[j] for j in rows], prompt_set.condition.select(rows))
        n = len(rows)
        got = []
        for idx, _, pixels, _ in generate(net, settings.objective, rank_indices(n, rank, world_size),
                                          seed=seed + run[0] * per_prompt, num_classes=meta.num_classes,
                                          steps=settings.steps, guidance=guidance, edm=settings.edm(), device=dev,
                                          batch_size=batch, decode=decode, prompts=repeated, shift=settings.shift):
            got += list(zip(idx, pixels))
        got = rows_on_rank0(got)
        if got is None:
            yield {}
            continue
        pixels = np.stack([r[1] for r in got])
        yield {p: pixels[q * per_prompt: (q + 1) * per_prompt] for q, p in enumerate(run)}


def _broadcast(obj: dict, world_size: int) -> dict:
    """Rank 0's ``obj`` on every rank."""
    if world_size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _tool() -> str:
    from tread_scale import __version__

    return f"tread_scale {__version__}"
