"""The EMA under DeepSpeed is checkpointed sharded and exported streamed (issue 21, item 6).

Fast tests (no processes) check the file formats with stand-in masters; one 2-rank ``torchrun`` launch (slow)
trains ZeRO-2 and ZeRO-3 runs cut at step 3 and resumed, next to uninterrupted ones, and checks

* the Composer checkpoint's EMA state is a marker without tensors, and the per-rank EMA files of the
  engine checkpoint, read back in one process (2 ranks → 1), equal the gathered (exported) EMA bitwise;
* the resumed run ends bitwise equal to the uninterrupted one (EMA included);
* the streamed export is byte-identical to the previous writer (``save_weights`` of the gathered dict).

This module is also that launch's entry point (``python -m tests.parallel.test_ema_shards CONFIG ...``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

STEPS, CUT = 6, 3
STAGES = (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# stand-ins for DeepSpeedMaster: the same pieces and ranges, without an engine

class _Master:
    """Pieces of the flattened parameters as ZeRO-1/2 (one flat partition cut across parameters) or ZeRO-3
    (each parameter split in ``world`` equal, padded pieces) lays them out for ``rank``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], rank: int, world: int, stage3: bool) -> None:
        self.shapes, self.rank, self.world, self.stage3 = shapes, rank, world, stage3
        total = sum(math.prod(s) for s in shapes.values())
        self.part = -(-total // world)
        self.params = dict.fromkeys(shapes)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def span(self, name: str) -> tuple[int, int]:
        numel = math.prod(self.shapes[name])
        if self.stage3:
            n = -(-numel // self.world)
            start = min(self.rank * n, numel)
            return start, min(start + n, numel)
        offset = 0
        for other, shape in self.shapes.items():  # the parameter's place in the flat buffer
            if other == name:
                break
            offset += math.prod(shape)
        lo, hi = self.rank * self.part, (self.rank + 1) * self.part
        a, b = max(lo, offset) - offset, min(hi, offset + numel) - offset
        return (a, b) if b > a else (0, 0)

    def piece_size(self, name: str) -> int:
        if self.stage3:
            return -(-math.prod(self.shapes[name]) // self.world)
        a, b = self.span(name)
        return b - a

    def piece_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        a, b = self.span(name)
        out = torch.zeros(self.piece_size(name))
        out[: b - a] = full.reshape(-1)[a:b]
        return out

    def gather(self, name, piece):  # the old checkpoint path; must not be used any more
        raise AssertionError(f"EMA.state_dict gathered {name} under DeepSpeed")


SHAPES = {"blocks.0.w": (5, 3), "blocks.0.b": (5,), "final.w": (2, 7), "tiny": (1,)}


def _ema_on(master: _Master, values: dict[str, torch.Tensor]):
    from tread_scale.trainer.callbacks.ema import EMA

    ema = EMA(0.9)
    ema._master, ema._deepspeed = master, True
    ema.shadow = {n: master.piece_of(n, v) for n, v in values.items()}
    return ema


def _walk_tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _walk_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _walk_tensors(v)]
    return []


def test_streamed_writer_is_byte_identical_to_save_weights(tmp_path):
    from tread_scale.errors import CheckpointError
    from tread_scale.weights import save_weights, save_weights_streaming, safetensors_order

    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.w": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g),
          "pos": torch.randn(1, 4, 2, generator=g).bfloat16(), "idx": torch.arange(5),
          "mask": torch.tensor([True, False]),
          "empty": torch.zeros(0, 3), "é.half": torch.randn(2, generator=g).half(), "scalar": torch.tensor(2.5)}
    meta = {"step": 3, "run_name": "ü \"quoted\"\n", "model": {"depth": 2}}
    old = save_weights(tmp_path / "old.safetensors", sd, meta)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    new = save_weights_streaming(tmp_path / "new.safetensors", specs,
                                 ((n, sd[n]) for n in safetensors_order(specs)), meta)
    assert new.read_bytes() == old.read_bytes()
    with pytest.raises(CheckpointError, match="expected"):  # out of order: refused, and no file is left
        save_weights_streaming(tmp_path / "bad.safetensors", specs, iter(sd.items()), meta)
    assert not list(tmp_path.glob("bad.safetensors*"))


@pytest.mark.parametrize("stage3", [False, True])
def test_sharded_ema_state_is_a_marker_and_restores_exactly(stage3, tmp_path):
    """``EMA.state_dict()`` under DeepSpeed gathers nothing once the shard files are written (the old code
    gathered every tensor on every rank), and loading the marker plus the files restores each piece bitwise."""
    g = torch.Generator().manual_seed(1)
    values = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    folder = tmp_path / "ba3" / "ema"
    saved = []
    for rank in range(2):
        ema = _ema_on(_Master(SHAPES, rank, 2, stage3), values)
        assert ema.save_shards(folder, "ba3") is not None
        state = ema.state_dict()  # _Master.gather raises: nothing may be gathered
        assert state["layout"] == "deepspeed-shards" and state["tag"] == "ba3" and not _walk_tensors(state)
        saved.append(state)
    assert sorted(p.name for p in folder.iterdir()) == ["rank00000-of-00002.safetensors",
                                                        "rank00001-of-00002.safetensors"]
    for rank in range(2):
        master = _Master(SHAPES, rank, 2, stage3)
        ema = _ema_on(master, {n: torch.zeros(s) for n, s in SHAPES.items()})
        ema.load_state_dict(saved[rank])
        assert ema.load_shards(folder, "ba3")
        for n, v in values.items():
            assert torch.equal(ema.shadow[n], master.piece_of(n, v)), n


def test_shard_files_are_read_on_another_world_size(tmp_path):
    """Elastic reading: files of 2 ZeRO-2 ranks give the full EMA in one process, and ZeRO-3 pieces of 3 ranks."""
    from tread_scale.trainer.backends.ema_shards import EMAShards

    g = torch.Generator().manual_seed(2)
    values = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    for rank in range(2):
        _ema_on(_Master(SHAPES, rank, 2, stage3=False), values).save_shards(tmp_path, "ba6")
    shards = EMAShards(tmp_path)
    assert shards.world_size == 2 and shards.tag == "ba6" and shards.decay == 0.9
    full = shards.full_state_dict()
    assert full.keys() == values.keys() and all(torch.equal(full[n], values[n]) for n in values)
    marker = {"decay": 0.9, "layout": "deepspeed-shards", "tag": "ba6", "world_size": 2, "shadow": {}}
    for rank in range(3):
        master = _Master(SHAPES, rank, 3, stage3=True)
        ema = _ema_on(master, {n: torch.zeros(s) for n, s in SHAPES.items()})
        ema.load_state_dict(marker)
        ema.load_shards(tmp_path, "ba6")
        assert all(torch.equal(ema.shadow[n], master.piece_of(n, values[n])) for n in values)


def test_incomplete_or_foreign_shards_are_refused(tmp_path):
    from tread_scale.errors import CheckpointError
    from tread_scale.trainer.backends.deepspeed import DeepSpeedCheckpoint
    from tread_scale.trainer.backends.ema_shards import EMAShards

    values = {n: torch.ones(s) for n, s in SHAPES.items()}
    _ema_on(_Master(SHAPES, 0, 2, stage3=False), values).save_shards(tmp_path / "ema", "ba3")
    with pytest.raises(CheckpointError, match="do not form one set of 2 ranks"):
        EMAShards(tmp_path / "ema")
    with pytest.raises(CheckpointError, match="no EMA shard files"):
        EMAShards(tmp_path / "nothing")
    # the engine's ZeRO partitions cannot move to another world size: said up front, with the folder
    with pytest.raises(CheckpointError, match="written by 2 ranks and this run has 1"):
        DeepSpeedCheckpoint._check_world_size(tmp_path)
    ema = _ema_on(_Master(SHAPES, 0, 1, stage3=False), values)
    ema.load_state_dict({"decay": 0.9, "layout": "deepspeed-shards", "tag": "ba3", "world_size": 2, "shadow": {}})
    with pytest.raises(CheckpointError, match="engine checkpoint being loaded is 'ba6'"):
        ema.load_shards(tmp_path / "ema", "ba6")
    ema._deepspeed = False
    with pytest.raises(CheckpointError, match="parallelism.backend=deepspeed"):
        ema.load_state_dict({"decay": 0.9, "layout": "deepspeed-shards", "tag": "ba3", "shadow": {}})


# ---------------------------------------------------------------------------------------------------------------
# the 2-rank launch

def main(argv: list[str]) -> int:
    """Entry point: per ZeRO stage, a run cut at ``CUT`` and resumed to ``STEPS`` and an uninterrupted one; a
    probe writes each run's final weights with the previous (gathering) writer beside the streamed export."""
    from composer.core import Callback
    from composer.utils import dist

    from tread_scale.config import load_config
    from tread_scale.trainer import callbacks as run_callbacks
    from tread_scale.trainer.builder import train
    from tread_scale.trainer.callbacks.net_copy import weights_to_sample
    from tread_scale.weights import load_weights, save_weights

    class PreviousWriter(Callback):
        def __init__(self, built):
            self.built = built

        def fit_end(self, state, logger):
            weights = weights_to_sample(state, self.built.ema)  # the old export: gathered on every rank
            if dist.get_global_rank() == 0:
                meta = load_weights(self.built.export.last_export)[1]
                save_weights(self.built.export.out_dir / "previous_writer.safetensors", weights, meta)

    build = run_callbacks.build_callbacks

    def build_with_probe(*args, **kwargs):
        built = build(*args, **kwargs)
        built.callbacks.append(PreviousWriter(built))
        return built

    run_callbacks.build_callbacks = build_with_probe
    config, overrides = argv[0], argv[1:]
    for stage in STAGES:
        zero = ["parallelism.backend=deepspeed", f"parallelism.deepspeed.zero_stage={stage}"]
        for name, durations in ((f"z{stage}_cut", (CUT, STEPS)), (f"z{stage}_straight", (STEPS,))):
            for steps in durations:
                train(load_config(config, [*overrides, *zero, f"run_name={name}", f"train.max_duration={steps}ba"]))
    return 0


@pytest.fixture(scope="module")
def runs(latent_dataset, tmp_path_factory) -> Path:
    from tests.conftest import tiny_run_cfg
    from tests.parallel.launcher import launch

    out = tmp_path_factory.mktemp("ema_shards")
    cfg = tiny_run_cfg(latent_dataset, out, train={"max_duration": f"{STEPS}ba", "save_interval": f"{CUT}ba",
                                                   "global_batch_size": 8, "device_microbatch_size": 2,
                                                   "deterministic": True},
                       logging={"metrics_interval": 1})
    cfg["model"].update(depth=2, hidden_size=32, num_heads=2)
    cfg["routing"] = {"routes": [{"rate": 0.5, "start": 1, "end": 1}]}
    cfg["run_name"] = "ema_shards"
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    launch(cfg, 2, out, module="tests.parallel.test_ema_shards", timeout=600)
    return out


@pytest.mark.slow  # one 2-rank launch of about a minute on a 2-core CPU
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_ema_checkpoints_sharded_resumes_bitwise_and_exports_streamed(stage, runs):
    from tests.parallel.launcher import losses
    from tread_scale.trainer.backends.ema_shards import EMAShards
    from tread_scale.weights import load_weights

    cut, straight = runs / f"z{stage}_cut", runs / f"z{stage}_straight"
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"not resumed at step {CUT}: {steps}"
    ckpts = cut / "checkpoints"
    for at in (CUT, STEPS):
        composer_state = torch.load(ckpts / f"ep0-ba{at}-rank0.pt", map_location="cpu", weights_only=False)
        ema_state = composer_state["state"]["callbacks"]["EMA"]
        assert ema_state["layout"] == "deepspeed-shards" and ema_state["tag"] == f"ba{at}", ema_state
        assert not _walk_tensors(ema_state), "the Composer checkpoint holds EMA tensors"
        folder = ckpts / "deepspeed" / f"ba{at}" / "ema"
        assert sorted(p.name for p in folder.iterdir()) == ["rank00000-of-00002.safetensors",
                                                            "rank00001-of-00002.safetensors"]
        exported = load_weights(cut / "ema" / f"ba{at:08d}.safetensors")[0]
        sharded = EMAShards(folder).full_state_dict()  # read in this one process: 2 ranks' files → 1
        assert sharded and all(torch.equal(sharded[n], exported[n]) for n in sharded), "shards != gathered EMA"
    resumed, uninterrupted = (load_weights(r / "ema" / "latest.safetensors")[0] for r in (cut, straight))
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"the resumed run's final EMA differs from the uninterrupted one in {differ[:5]}"
    assert losses(cut) == pytest.approx(losses(straight), rel=1e-6)
    for run in (cut, straight):  # the streamed export: byte for byte what the gathering writer wrote
        streamed = (run / "ema" / f"ba{STEPS:08d}.safetensors").read_bytes()
        assert streamed == (run / "ema" / "previous_writer.safetensors").read_bytes()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
