"""``MetricsLog``: the global mean training loss, throughput and wall-clock time as JSON lines."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.jsonl import last_record_per_step

log = logging.getLogger(__name__)


class MetricsLog(Callback):
    """Every ``interval`` batches, append ``{"step", "loss", "samples", "wall_s", "samples_per_s",
    "tflops_per_device", "mfu", "train_wall_s", "train_flops"}`` to a file.

    ``loss`` is the mean over the *global* batch and all its micro-batches (Composer all-reduces it every
    step into ``state.total_loss_dict``), so runs with different world sizes, micro-batch splits or
    backends are directly comparable.

    ``tflops_per_device`` counts model FLOPs (routing-aware: tokens that skip blocks are not counted;
    recomputation is not counted) per second per rank; ``mfu`` divides it by the device's peak, given as
    ``peak_flops`` or looked up in Composer's table of GPUs for the run's precision (absent on CPU). The
    FLOPs are summed batch by batch with the routes in use at each batch, so under a routing schedule they
    follow its stages; ``rate_factor`` (routed runs) is the schedule's factor at the record's batch.

    ``wall_s`` is the time since this process started fitting (it restarts at a resume, and includes in-training
    evaluation). The two cumulative fields, for comparing runs at equal cost (``tread-scale plot --target``),
    count from batch 0 and continue across resumes (they are saved in the checkpoint):

    - ``train_flops``: global training FLOPs of every batch up to and including the record's (all of them,
      not only the logged ones); absent when the model cannot count its FLOPs.
    - ``train_wall_s``: training seconds up to the end of the record's batch: for each batch, the time from
      fetching its data to this callback's ``batch_end`` (forward, backward, optimizer step, EMA update and
      the callbacks before this one, e.g. a due sample grid). What runs after it until the next batch is
      fetched is left out: in-training evaluation (FID, validation loss), checkpoints and exports. On GPU the
      device is synchronized at ``batch_end`` so that a batch's queued work is counted in it. Absent after
      resuming from a checkpoint written before it was recorded (it would restart at 0).

    Args:
        path: ``metrics.jsonl`` path (written by rank 0; appended to on resume).
        interval: Batches between records.
        peak_flops: Peak FLOP/s of one device for MFU (``None``: known GPUs only).
    """

    def __init__(self, path: str | Path, interval: int = 1, peak_flops: float | None = None) -> None:
        self.path = Path(path)
        self.interval = max(1, int(interval))
        self.peak_flops = peak_flops
        self._model = None
        self._flops = 0.0  # global training FLOPs since the last record
        self._samples = 0
        self._t0 = time.time()
        self._last: tuple[float, int] | None = None
        self._train_flops = 0.0  # global training FLOPs since batch 0, continued across resumes
        self._train_s = 0.0  # training seconds since batch 0 (time between batches left out), continued
        self._counted = True  # False after resuming from a checkpoint without the two counters
        self._batch_t0: float | None = None
        self._sync = False

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self._train_flops, "train_wall_s": self._train_s} if self._counted else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_wall_s" in state:
            self._train_flops, self._train_s = float(state["train_flops"]), float(state["train_wall_s"])
        else:
            self._counted = False
            log.warning("the checkpoint predates train_wall_s/train_flops in metrics.jsonl: the resumed run "
                        "does not record them (they would restart at 0)")

    def fit_start(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        self._model = model if hasattr(model, "train_flops_per_sample") else None
        if self.peak_flops is None and state.device.name == "gpu":
            from composer.callbacks.speed_monitor import get_gpu_flops_available

            self.peak_flops = float(get_gpu_flops_available(state)) or None
        self._t0 = time.time()
        self._last = (self._t0, int(state.timestamp.sample))
        self._samples, self._flops = int(state.timestamp.sample), 0.0
        self._sync = state.device.name == "gpu"

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._batch_t0 = time.time()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._sync:
            import torch

            torch.cuda.synchronize()
        if self._batch_t0 is not None:
            self._train_s += time.time() - self._batch_t0
            self._batch_t0 = None
        step = int(state.timestamp.batch)
        samples = int(state.timestamp.sample)
        if self._model is not None:  # the routes in use for this batch (a schedule changes them)
            batch = getattr(state, "batch", None)
            latent = batch.get("latent") if isinstance(batch, dict) else None
            hw = None if latent is None else tuple(latent.shape[-2:])  # every rank's batch is of one bucket
            batch_flops = (samples - self._samples) * float(self._model.train_flops_per_sample(hw))
            self._flops += batch_flops
            self._train_flops += batch_flops
        self._samples = samples
        if step % self.interval:
            return
        if dist.get_global_rank() != 0:
            return
        value = (getattr(state, "total_loss_dict", None) or {}).get("loss/train/total")
        if value is None:
            return
        now, samples = time.time(), int(state.timestamp.sample)
        last_t, last_s = self._last or (self._t0, 0)
        rate = (samples - last_s) / max(now - last_t, 1e-9)
        self._last = (now, samples)
        record = {"step": step, "loss": float(value), "samples": samples, "wall_s": round(now - self._t0, 3),
                  "samples_per_s": round(rate, 2)}
        metrics = {"train/global_loss": record["loss"], "throughput/samples_per_s": rate}
        router = getattr(getattr(self._model, "net", None), "router", None)
        if router is not None:
            record["rate_factor"] = router.rate_factor
        if self._counted:
            record["train_wall_s"] = round(self._train_s, 3)
            if self._model is not None:
                record["train_flops"] = self._train_flops
        flops, self._flops = self._flops, 0.0
        if flops:
            per_device = flops / max(now - last_t, 1e-9) / dist.get_world_size()
            record["tflops_per_device"] = float(f"{per_device / 1e12:.6g}")
            metrics["throughput/device/flops_per_sec"] = per_device
            if self.peak_flops:
                record["mfu"] = float(f"{per_device / self.peak_flops:.6g}")
                metrics["throughput/device/mfu"] = record["mfu"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.log_metrics(metrics)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file in step order; a resumed run's re-logged steps replace the earlier.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    return last_record_per_step(path)


__all__ = ["MetricsLog", "read_metrics"]
