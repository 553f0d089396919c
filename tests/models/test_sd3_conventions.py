"""Issue 21.3-4: the MMDiT (and the rectified-flow DiT) on SD3's conventions.

Timestep x 1000 into the sinusoid, SD3's timestep shift in training and sampling (the formula checked against
diffusers' FlowMatchEulerDiscreteScheduler), float32 residual streams under bf16 autocast whatever the position
mode, and the choice to attend to padded text (SD3, Flux) or mask it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_run_cfg
from tests.models.test_mmdit import inputs, text, tiny
from tread_scale.config import config_from_dict
from tread_scale.diffusion.rectified_flow import RectifiedFlow, rf_euler_sample, shift_time
from tread_scale.errors import CheckpointError, ConfigError
from tread_scale.factory import build_net, build_objective
from tread_scale.models.embeddings import TimestepEmbedder
from tread_scale.rng import BatchRandom


def _cfg(tmp_path, objective=None, **model):
    raw = tiny_run_cfg("/d", tmp_path)
    raw["model"].update(model)
    if objective:
        raw["objective"] = objective
    return config_from_dict(raw)


def _variance_in_top2(features: torch.Tensor) -> float:
    centred = features - features.mean(0)
    s = torch.linalg.svdvals(centred.double())
    return float((s[:2] ** 2).sum() / (s ** 2).sum())


def test_rectified_flow_feeds_the_timestep_sinusoid_t_times_1000(tmp_path):
    t = torch.linspace(0, 1, 512)
    rf = build_net(_cfg(tmp_path, {"kind": "rf"}).model)
    edm = build_net(_cfg(tmp_path).model)
    assert rf.t_embedder.scale == 1000.0 and edm.t_embedder.scale == 1.0
    # the finding: fed t in [0, 1], 256 sinusoid features span a nearly 2-D set; fed 1000 t they do not
    assert _variance_in_top2(TimestepEmbedder(8, scale=1.0).sinusoid(t)) > 0.999
    assert _variance_in_top2(rf.t_embedder.sinusoid(t)) < 0.9
    assert torch.equal(TimestepEmbedder(8, scale=1000.0).sinusoid(t), TimestepEmbedder(8).sinusoid(t * 1000))


def test_timestep_scale_is_recorded_and_old_weights_keep_1(tmp_path):
    from tread_scale.weights import WeightsMeta

    cfg = _cfg(tmp_path, {"kind": "rf"}, family="dit")
    assert cfg.model.timestep_scale == 1000.0  # resolved at validation, so a run's weights record it
    recorded = {"name": None, "family": "dit", "depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2,
                "input_size": 8, "num_classes": 5}  # a model section written before timestep_scale existed
    meta = WeightsMeta(model=recorded, routing={}, objective={"kind": "rf"}, data={"latent_shape": [4, 8, 8]})
    assert meta.model_config().timestep_scale == 1.0
    assert WeightsMeta(model={**recorded, "timestep_scale": 1000.0}, routing={}, objective={"kind": "rf"},
                       data={"latent_shape": [4, 8, 8]}).model_config().timestep_scale == 1000.0
    with pytest.raises(ConfigError, match="model.timestep_scale=0"):
        _cfg(tmp_path, {"kind": "rf"}, timestep_scale=0)


def test_init_from_weights_of_another_timestep_scale_is_refused(tmp_path):
    from tread_scale.sampling import load_initial_weights
    from tread_scale.weights import save_weights

    old = build_net(_cfg(tmp_path, {"kind": "rf"}, timestep_scale=1.0).model)
    path = tmp_path / "old.safetensors"
    model = {"name": None, "family": "dit", "depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2,
             "input_size": 8, "num_classes": 5}
    save_weights(path, old.state_dict(), {"model": model, "objective": {"kind": "rf"}})
    new = build_net(_cfg(tmp_path, {"kind": "rf"}).model)
    with pytest.raises(CheckpointError, match=r"trained with model.timestep_scale=1 .* set model.timestep_scale=1"):
        load_initial_weights(new, path)
    load_initial_weights(build_net(_cfg(tmp_path, {"kind": "rf"}, timestep_scale=1.0).model), path)


def test_shift_matches_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = shift_time(plain.sigmas.double(), 3.0)
    assert torch.allclose(ours.float(), shifted.sigmas.float(), atol=1e-6)


def test_training_and_sampling_use_the_shift(tmp_path):
    cfg = _cfg(tmp_path, {"kind": "rf", "shift": 3.0})
    flow = build_objective(cfg.objective)
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(BatchRandom(4096, "cpu", g))
    base = RectifiedFlow().sample_t(BatchRandom(4096, "cpu", torch.Generator().manual_seed(0)))
    assert torch.allclose(t, shift_time(base, 3.0)) and t.mean() > base.mean() + 0.1
    seen = []
    rf_euler_sample(lambda z, t: seen.append(float(t)) or torch.zeros_like(z), torch.randn(1, 4, 8, 8), num_steps=4,
                    shift=3.0)
    assert np.allclose(seen, [shift_time(i / 4, 3.0) for i in (4, 3, 2, 1)])
    # a straight path x -> noise is integrated exactly on any grid: the shifted sampler lands on x
    x0 = torch.randn(2, 4, 8, 8)
    out = rf_euler_sample(lambda z, t: (z - x0) / t, torch.randn(2, 4, 8, 8), num_steps=5, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-5)
    with pytest.raises(ConfigError, match="objective.shift=3.0 applies to rectified flow"):
        _cfg(tmp_path, {"kind": "edm", "shift": 3.0})


def test_weights_carry_the_shift_to_sampling(tmp_path):
    from tread_scale.weights import WeightsMeta

    cfg = _cfg(tmp_path, {"kind": "rf", "shift": 3.0})
    from tread_scale.config import to_dict

    meta = WeightsMeta(model=to_dict(cfg.model), routing={}, objective=to_dict(cfg.objective),
                       data={"latent_shape": [4, 8, 8]})
    assert json.loads(json.dumps(meta.objective))["shift"] == 3.0 and meta.shift == 3.0
    assert WeightsMeta(model={}, routing={}, objective={"kind": "rf"}, data={}).shift == 1.0


@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "rope"])
def test_residual_streams_are_float32_under_bf16_autocast(pos_embed):
    net = tiny(pos_embed=pos_embed)
    seen = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype)))
    x, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, t, text())
    assert seen == [(torch.float32, torch.float32)]


def test_text_mask_false_attends_to_padding_without_a_mask(monkeypatch):
    cond = text()  # prompts with 3, 5 and 0 valid tokens of 5
    full = type(cond)(cond.emb, torch.ones_like(cond.mask), cond.pooled)
    x, t = inputs()
    masked, unmasked = tiny(), tiny(text_mask=False)
    unmasked.load_state_dict(masked.state_dict())
    masks = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: masks.append(k.get("attn_mask")) or sdpa(*a, **k))
    out = unmasked(x, t, cond)
    assert masks and all(m is None for m in masks)  # no mask: SDPA may take its flash kernel
    assert torch.allclose(out, unmasked(x, t, full), atol=1e-6)  # padding is attended to like any token
    assert not torch.allclose(masked(x, t, cond), out, atol=1e-3)  # the default masks it out
