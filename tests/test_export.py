"""Export to diffusers' DiT layout, and import of facebookresearch/DiT checkpoints."""

import pytest
import torch

from tread_scale.config import ModelConfig, to_dict
from tread_scale.errors import CheckpointError
from tread_scale.export import export_diffusers, import_facebook_dit, load_diffusers
from tread_scale.factory import build_dit
from tread_scale.routing import Route
from tread_scale.weights import load_weights, save_weights


def _weights(tmp_path, routes=(Route(0.5, 1, 2),)):
    cfg = ModelConfig(name=None, depth=3, hidden_size=64, num_heads=4, patch_size=2, in_channels=4, input_size=8,
                      num_classes=7, init="xavier_all")
    torch.manual_seed(0)
    net = build_dit(cfg, list(routes))
    for p in net.parameters():  # non-trivial values everywhere (xavier leaves biases at 0)
        p.data.add_(torch.randn_like(p) * 0.02)
    meta = {"model": to_dict(cfg), "routing": {"routes": [r.__dict__ for r in routes]},
            "objective": {"kind": "edm", "sigma_data": 0.5},
            "data": {"latent_shape": [4, 8, 8], "num_classes": 7, "vae": "none"}}
    return net.eval(), save_weights(tmp_path / "ema.safetensors", net.state_dict(), meta)


def test_diffusers_export_reproduces_our_outputs(tmp_path):
    net, path = _weights(tmp_path)
    out = export_diffusers(path, tmp_path / "diffusers")
    assert (out / "config.json").is_file() and (out / "tread_scale.json").is_file()
    model = load_diffusers(out)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, -0.7]), torch.tensor([1, 7])
    with torch.no_grad():
        ours = net(x, t, y)
        theirs = model(x, timestep=t, class_labels=y).sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # without our fix, diffusers' own timestep frequencies (k/127) give a slightly different output
    from diffusers import DiTTransformer2DModel

    raw = DiTTransformer2DModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert not torch.allclose(ours, raw(x, timestep=t, class_labels=y).sample, atol=1e-6)


def test_import_facebook_dit_checkpoint_drops_the_variance_head(tmp_path):
    net, _ = _weights(tmp_path, routes=())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    # a learn_sigma checkpoint: per patch position, 4 mean channels then 4 variance channels
    w = state["final_layer.linear.weight"].view(4, 4, 64)
    b = state["final_layer.linear.bias"].view(4, 4)
    state["final_layer.linear.weight"] = torch.cat([w, torch.randn_like(w)], 1).reshape(32, 64)
    state["final_layer.linear.bias"] = torch.cat([b, torch.randn_like(b)], 1).reshape(32)
    torch.save({"ema": state, "model": state}, tmp_path / "0400000.pt")
    with pytest.raises(CheckpointError, match="does not fit DiT-S/2"):
        import_facebook_dit(tmp_path / "0400000.pt", tmp_path / "x.safetensors", "DiT-S/2", num_classes=7,
                            input_size=8)
    # a custom-size import goes through the registry, so check the mapping with the registry's S/8 instead
    small = build_dit(ModelConfig(name="DiT-S/8", num_classes=7, input_size=16))
    fb = {k: v.clone() for k, v in small.state_dict().items()}
    w = fb["final_layer.linear.weight"].view(64, 4, 384)
    fb["final_layer.linear.weight"] = torch.cat([w, torch.randn_like(w)], 1).reshape(512, 384)
    bb = fb["final_layer.linear.bias"].view(64, 4)
    fb["final_layer.linear.bias"] = torch.cat([bb, torch.randn_like(bb)], 1).reshape(512)
    torch.save(fb, tmp_path / "DiT-S-8.pt")
    out = import_facebook_dit(tmp_path / "DiT-S-8.pt", tmp_path / "s8.safetensors", "DiT-S/8", num_classes=7,
                              input_size=16)
    weights, meta = load_weights(out)
    assert torch.equal(weights["final_layer.linear.weight"], small.state_dict()["final_layer.linear.weight"])
    assert meta["model"]["name"] == "DiT-S/8" and meta["routing"]["routes"] == []


def test_import_refuses_pickled_code(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        import_facebook_dit(tmp_path / "model.pt", tmp_path / "o.safetensors", "DiT-S/2")


class _NotAllowed:
    """A class of the test module: unpickling it would need a full (code-running) unpickle."""


def test_training_checkpoint_with_another_class_is_refused_by_name(tmp_path):
    import argparse

    state = {"final_layer.linear.weight": torch.zeros(2, 2)}
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2"), "extra": _NotAllowed()}, tmp_path / "0000100.pt")
    with pytest.raises(CheckpointError, match=r"it holds tests\.test_export\._NotAllowed, .*refusing to unpickle code"):
        import_facebook_dit(tmp_path / "0000100.pt", tmp_path / "o.safetensors", "DiT-S/2")
    assert not (tmp_path / "o.safetensors").exists()


def test_weights_choice_is_checked(tmp_path):
    state = {"final_layer.linear.weight": torch.zeros(2, 2)}
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain state dict .* 'model' applies to training checkpoints only"):
        import_facebook_dit(tmp_path / "plain.pt", tmp_path / "o.safetensors", "DiT-S/2", weights="model")
    torch.save({"model": state}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="has no 'ema' state dict \\(its keys: model\\)"):
        import_facebook_dit(tmp_path / "no_ema.pt", tmp_path / "o.safetensors", "DiT-S/2")
