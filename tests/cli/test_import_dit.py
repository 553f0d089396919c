"""``tread-scale import-dit`` of a facebookresearch/DiT *training* checkpoint ``{model, ema, opt, args}``."""

import argparse

import pytest
import torch

from tread_scale.cli import main
from tread_scale.config import ModelConfig
from tread_scale.factory import build_dit
from tread_scale.weights import load_weights

# what facebookresearch/DiT's train.py parses (and saves as the checkpoint's "args")
DIT_ARGS = dict(data_path="/data/imagenet/train", results_dir="results", model="DiT-S/8", image_size=128,
                num_classes=7, epochs=1400, global_batch_size=256, global_seed=0, vae="ema", num_workers=4,
                log_every=100, ckpt_every=50_000)


def _learn_sigma(state: dict, patch: int = 8, channels: int = 4) -> dict:
    """DiT's learn_sigma head: per patch position, ``channels`` mean values then ``channels`` variance values."""
    state = dict(state)
    w = state["final_layer.linear.weight"].view(patch * patch, channels, -1)
    b = state["final_layer.linear.bias"].view(patch * patch, channels)
    state["final_layer.linear.weight"] = torch.cat([w, torch.randn_like(w)], 1).reshape(2 * w.shape[0] * channels, -1)
    state["final_layer.linear.bias"] = torch.cat([b, torch.randn_like(b)], 1).reshape(-1)
    return state


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A DiT-S/8 training checkpoint laid out as DiT's train.py writes it (``0000100.pt``)."""
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    net = build_dit(ModelConfig(name="DiT-S/8", num_classes=7, input_size=16))
    model = _learn_sigma(net.state_dict())
    ema = dict(model)  # EMA differs from the raw weights in a few tensors (the rest share storage on disk)
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"):
        ema[key] = model[key] + 0.01 * torch.randn_like(model[key])
    params = [net.final_layer.linear.weight, net.final_layer.linear.bias]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    sum(p.sum() for p in params).backward()
    opt.step()
    path = root / "0000100.pt"
    torch.save({"model": model, "ema": ema, "opt": opt.state_dict(), "args": argparse.Namespace(**DIT_ARGS)}, path)
    return {"root": root, "path": path, "model": model, "ema": ema}


def _mean_head(state: dict) -> torch.Tensor:
    return state["final_layer.linear.weight"].view(64, 8, -1)[:, :4].reshape(256, -1)


@pytest.mark.parametrize("which", ["ema", "model"])
def test_training_checkpoint_imports_the_chosen_weights(training_checkpoint, which):
    ck = training_checkpoint
    out = ck["root"] / f"{which}.safetensors"
    args = ["import-dit", str(ck["path"]), "--model", "DiT-S/8", "--num-classes", "7", "--input-size", "16",
            "--out", str(out)] + ([] if which == "ema" else ["--weights", "model"])
    assert main(args) == 0
    weights, meta = load_weights(out)
    want = ck[which]
    assert torch.equal(weights["x_embedder.proj.weight"], want["x_embedder.proj.weight"])
    assert torch.equal(weights["final_layer.linear.weight"], _mean_head(want))
    assert torch.equal(weights["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    assert meta["ema"] is (which == "ema") and meta["source"] == f"facebookresearch/DiT 0000100.pt ({which})"
    # the Namespace was allowed for that load only
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(str(ck["path"]), weights_only=True)


def test_training_checkpoint_args_must_fit(training_checkpoint, capsys):
    ck = training_checkpoint
    out = str(ck["root"] / "x.safetensors")
    assert main(["import-dit", str(ck["path"]), "--model", "DiT-S/8", "--num-classes", "7", "--out", out]) == 2
    assert "was trained with image_size=128 (its args.image_size), not 256" in capsys.readouterr().err
