"""``WeightsMeta``: the typed metadata of weight files, and what training and import-dit record."""

import pytest
import torch

from tread_scale.config import config_from_dict
from tread_scale.data.metadata import LatentMetadata
from tread_scale.errors import CheckpointError
from tread_scale.weights import DataFacts, WeightsMeta, load_weights, load_weights_and_meta, resolve_weights, \
    save_weights

from tests.conftest import tiny_run_cfg


def test_from_run_records_what_rebuilding_and_sampling_need(tmp_path):
    cfg = config_from_dict(tiny_run_cfg("/d", tmp_path))
    data = LatentMetadata(latent_shape=(4, 8, 8), num_classes=5, num_samples=64, vae="sd-vae", scaling_factor=0.18,
                          class_names=["a", "b", "c", "d", "e"])
    meta = WeightsMeta.from_run(cfg, data)
    d = meta.to_dict()
    assert set(d) == {"run_name", "model", "routing", "objective", "data"}
    assert d["run_name"] == "t" and d["model"]["depth"] == 4 and d["routing"]["routes"][0]["rate"] == 0.5
    assert d["data"] == {"latent_shape": [4, 8, 8], "num_classes": 5, "vae": "sd-vae", "scaling_factor": 0.18,
                         "class_names": ["a", "b", "c", "d", "e"]}
    assert meta.objective_kind == "edm" and meta.sigma_data == 0.5 and meta.num_classes == 5
    assert meta.model_config() == cfg.model and meta.routing_config().routes == cfg.routing.routes
    stepped = meta.at_step(12, ema=True)
    assert stepped.to_dict() == {**d, "step": 12, "ema": True} and meta.step is None


def test_round_trip_through_a_file_keeps_unknown_keys(tmp_path):
    meta = WeightsMeta(model={"name": "DiT-S/2"}, objective={"kind": "rf"},
                       data=DataFacts(latent_shape=[4, 32, 32], num_classes=10), source="somewhere", step=0, ema=True,
                       extra={"note": "kept"})
    path = save_weights(tmp_path / "w.safetensors", {"x": torch.ones(2)}, meta)
    tensors, raw = load_weights(path)
    assert raw == meta.to_dict() and raw["note"] == "kept" and "run_name" not in raw
    assert load_weights_and_meta(path)[1] == meta
    assert WeightsMeta.from_dict(raw).to_dict() == raw


def test_missing_fields_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="lacks objective, data.num_classes"):
        WeightsMeta.from_dict({"model": {}, "data": {"latent_shape": [4, 8, 8]}}, "w.safetensors")


def test_resolve_weights_of_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="without ema/latest.safetensors"):
        resolve_weights(tmp_path)
    (tmp_path / "ema").mkdir()
    (tmp_path / "ema" / "latest.safetensors").write_bytes(b"")
    assert resolve_weights(tmp_path) == tmp_path / "ema" / "latest.safetensors"
    assert resolve_weights(tmp_path / "x.safetensors") == tmp_path / "x.safetensors"


@pytest.fixture
def umask_002():
    import os

    old = os.umask(0o002)
    yield 0o664
    os.umask(old)


def test_written_weights_get_the_usual_file_mode(tmp_path, umask_002):
    """Issue 22.9: safetensors' save_file creates its file 0600, files written with open() get 0666 & ~umask."""
    import os
    import shutil
    import stat

    from tread_scale.files import replace_atomically
    from tread_scale.weights import safetensors_order, save_weights_streaming

    sd = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    meta = {"step": 1}
    exported = save_weights(tmp_path / "export.safetensors", sd, meta)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    streamed = save_weights_streaming(tmp_path / "ema" / "ba00000002.safetensors", specs,
                                      [(k, sd[k]) for k in safetensors_order(specs)], meta)
    latest = tmp_path / "ema" / "latest.safetensors"  # as EMAExport makes it
    shutil.copyfile(streamed, latest.with_name("latest.safetensors.tmp"))
    replace_atomically(latest.with_name("latest.safetensors.tmp"), latest)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (exported, streamed, latest)}
    assert modes == dict.fromkeys(modes, umask_002), {k: oct(v) for k, v in modes.items()}
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []
