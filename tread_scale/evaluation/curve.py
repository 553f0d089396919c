"""FID curve of a run: the FID of each EMA export (``ema/ba<N>.safetensors``), one JSON line per checkpoint.

Works on a finished or a running run (exports are written atomically), on every rank of a launched process
group (:func:`~tread_scale.evaluation.fid.fid_of_weights` splits the samples), and resumes: checkpoints
already in the output file are skipped, so a killed evaluation, or one run again after training went on,
evaluates only what is new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from tread_scale.errors import CheckpointError, ConfigError
from tread_scale.jsonl import last_record_per_step

log = logging.getLogger(__name__)

#: Default output file, inside the run folder.
CURVE_FILE = "fid_curve.jsonl"
_EXPORT = re.compile(r"^ba(\d+)\.safetensors$")
#: Settings that change the scores: an output file holds the curve of one setting only.
_CHECKED = ("num", "seed", "steps", "extra", "guidance", "ref_num", "prompts", "prompt_data", "clip")


def parse_every(text: str) -> int:
    """Batches between evaluated checkpoints from ``10000ba`` (or ``10000``).

    Raises:
        ConfigError: If ``text`` is not a positive number of batches.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(ba)?\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"--every {text!r}: give a positive number of batches, e.g. 10000ba (exported EMA "
                          "weights are named by batch)")
    return int(m.group(1))


def exported_weights(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``<run>/ema/ba<N>.safetensors``, by step.

    Raises:
        CheckpointError: If ``run_dir`` is not a folder or has no exported weights.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a run folder (--every/--all evaluate the ema/ba<N>.safetensors "
                              "files of a training run)")
    found = sorted((int(m.group(1)), p) for p in (run / "ema").glob("ba*.safetensors")
                   if (m := _EXPORT.match(p.name)))
    if not found:
        raise CheckpointError(f"{run / 'ema'}: no exported weights (ba<N>.safetensors) yet; they are written at "
                              "every checkpoint (train.save_interval)")
    return found


def select(exported: list[tuple[int, Path]], every: int | None) -> list[tuple[int, Path]]:
    """The exports whose step is a multiple of ``every`` (all of them for ``None``).

    Raises:
        ConfigError: If no export is at a multiple of ``every``, naming the exported steps.
    """
    chosen = [e for e in exported if every is None or e[0] % every == 0]
    if not chosen:
        steps = ", ".join(str(s) for s, _ in exported[:8]) + (", ..." if len(exported) > 8 else "")
        raise ConfigError(f"--every {every}ba: no exported weights at a multiple of {every} batches (exported "
                          f"steps: {steps}); use a multiple of train.save_interval, or --all")
    return chosen


def curve_settings(fid_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a record stores of the evaluation's settings (JSON-normalised; see ``_CHECKED``)."""
    out = {k: v for k, v in fid_kwargs.items() if k not in ("batch_size", "device", "save_ref", "encoders")}
    if out.get("prompts") is not None:  # a prompt file may hold 30K prompts: its count and hash, not its text
        text = "\n".join(out["prompts"]).encode()
        out["prompts"] = f"{len(out['prompts'])} prompts, sha256 {hashlib.sha256(text).hexdigest()[:16]}"
    guidance = out.get("guidance")
    out["guidance"] = dataclasses.asdict(guidance) if dataclasses.is_dataclass(guidance) else guidance
    return json.loads(json.dumps(out))


def done_steps(out: Path, run_name: str, settings: dict[str, Any]) -> set[int]:
    """Steps already in ``out``, after checking its records are of this run and these settings.

    Raises:
        ConfigError: If a record is of another run or was made with other settings, naming the key.
    """
    if not out.is_file():
        return set()
    try:
        records = last_record_per_step(out, "fid")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{out}: not a FID curve written by tread-scale fid ({type(e).__name__}: {e})") from None
    for rec in records:
        if rec.get("run") != run_name:
            raise ConfigError(f"{out} holds the curve of run {rec.get('run')!r}, not {run_name!r}; give another --out")
        theirs = rec.get("settings") or {}
        for key in _CHECKED:
            if theirs.get(key) != settings.get(key):
                raise ConfigError(f"{out}: step {rec['step']} was evaluated with {key}={theirs.get(key)!r}, this "
                                  f"run asks for {key}={settings.get(key)!r}; give another --out to start a new "
                                  "curve")
    return {rec["step"] for rec in records}


def _append(out: Path, record: dict[str, Any]) -> None:
    """Add one line to ``out`` atomically (a killed run never leaves half a line)."""
    text = out.read_text() if out.is_file() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text + json.dumps(record) + "\n")
    tmp.replace(out)


def _plan(run_dir: Path, out: Path, every: int | None, settings: dict[str, Any]) -> list[tuple[int, Path]]:
    """The checkpoints still to evaluate (rank 0 decides, every rank gets the same list or the same error)."""
    from tread_scale.sampling import world

    plan: list[tuple[int, Path]] | Exception = []
    if world()[0] == 0:
        try:
            chosen = select(exported_weights(run_dir), every)
            done = done_steps(out, run_dir.name, settings)
            plan = [(s, p) for s, p in chosen if s not in done]
            log.info("FID curve of %s: %d checkpoints selected, %d already in %s, %d to evaluate", run_dir,
                     len(chosen), len(chosen) - len(plan), out, len(plan))
        except (ConfigError, CheckpointError) as e:
            plan = e
    if world()[1] > 1:
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if isinstance(plan, Exception):
        raise plan
    return plan


def fid_curve(run_dir: str | Path, out: str | Path | None = None, every: int | None = None,
              val: dict[str, Any] | None = None, **fid_kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate the exported EMA weights of a run, one JSON line per checkpoint, skipping those done.

    Every rank of the process group (if any) must call this with the same arguments. Each record holds
    ``step``, ``wall_s`` (training wall-clock seconds up to that step, as recorded at export; ``None`` for
    files exported before it was recorded), ``weights``, every key :func:`fid_of_weights` returned (``fid``,
    ``num_samples``, ``comparable_to_published``, ...), ``run``, ``routing``, ``settings`` and ``eval_s``.

    Args:
        run_dir: The run folder (``runs/<name>``) with ``ema/ba<N>.safetensors``.
        out: The ``.jsonl`` to append to (default ``<run>/fid_curve.jsonl``).
        every: Evaluate the checkpoints at multiples of this many batches; ``None``: all of them.
        val: Also the fixed-timestep validation loss of each checkpoint: the keyword arguments of
            :func:`~tread_scale.evaluation.val_loss.val_loss_of_weights` (``data``, ``num_samples``, ...); its
            ``val_loss``, ``val_loss_by_level`` and ``val_protocol`` join the record.
        **fid_kwargs: As for :func:`~tread_scale.evaluation.fid.fid_of_weights` (``inception``, a reference,
            ``num``, ``seed``, ``steps``, ``guidance``, ...).

    Returns:
        The records added by this call on rank 0 (an empty list on the other ranks).

    Raises:
        ConfigError: If ``out`` holds another run's curve or one of other settings, or ``every`` selects none.
        CheckpointError: If the run has no exported weights, or weights cannot be loaded.
    """
    from tread_scale.evaluation.fid import fid_of_weights
    from tread_scale.sampling import world
    from tread_scale.weights import read_meta

    run = Path(run_dir)
    out = Path(out) if out is not None else run / CURVE_FILE
    settings = curve_settings(fid_kwargs)
    if fid_kwargs.get("ref") is None and world()[0] == 0:
        log.warning("the reference statistics are computed again for every checkpoint; compute them once with "
                    "--save-ref and pass --ref to save that time")
    added = []
    plan = _plan(run, out, every, settings)
    for i, (step, path) in enumerate(plan, 1):
        t0 = time.time()
        result = fid_of_weights(str(path), **fid_kwargs)
        if val:
            from tread_scale.evaluation.val_loss import val_loss_of_weights

            result.update(val_loss_of_weights(str(path), **val))
        if world()[0] == 0:
            meta = read_meta(path)
            record = {"step": step, "wall_s": meta.train_wall_s, "weights": str(path), **result,
                      "run": run.name, "routing": meta.routing, "settings": settings,
                      "eval_s": round(time.time() - t0, 2)}
            _append(out, record)
            log.info("FID curve %d/%d: step %d fid %.4g%s (%s)", i, len(plan), step, result["fid"],
                     f" val_loss {result['val_loss']:.6g}" if val else "", out)
            added.append(record)
    return added


__all__ = ["CURVE_FILE", "curve_settings", "done_steps", "exported_weights", "fid_curve", "parse_every", "select"]
