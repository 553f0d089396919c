"""``tread-scale dry-run``: counts, FLOPs and the memory model against measurements."""

import pytest
import torch

from tread_scale.cli import main
from tread_scale.config import load_config
from tread_scale.models import DiT
from tread_scale.models.conditioning import TextCondition
from tread_scale.models.mmdit import MMDiT
from tread_scale.models.flops import model_flops
from tread_scale.parallel.memory import activation_bytes
from tread_scale.parallel.plan import dry_run
from tread_scale.routing import Route, TokenRouter

from tests.conftest import REPO


def _saved_activation_bytes(net, x, t, y):
    """Bytes of distinct non-parameter storages autograd saves for backward in one forward pass.

    (Under activation checkpointing, recomputation installs its own hooks, so only what the forward pass
    keeps is seen.)
    """
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, t, y).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("routes,checkpointing", [((), False), ((Route(0.5, 1, 2),), False), ((Route(0.5, 1, 2),), True)])
def test_activation_estimate_matches_saved_tensors(routes, checkpointing):
    torch.manual_seed(0)
    net = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=5,
              init="xavier_all")
    if routes:
        net.attach_router(TokenRouter(list(routes)))
    net.grad_checkpointing = checkpointing
    net.train()
    b = 4
    measured = _saved_activation_bytes(net, torch.randn(b, 4, 16, 16), torch.rand(b), torch.arange(b))
    estimate = activation_bytes(net, list(routes), b, 4, checkpointing, include_recompute=False)
    assert estimate == pytest.approx(measured, rel=0.25), (estimate, measured)


@pytest.mark.parametrize("qk_norm,routes,checkpointing", [
    (True, (), False), (False, (), False), (True, (Route(0.5, 1, 2),), False), (True, (Route(0.5, 1, 2),), True)])
def test_mmdit_activation_estimate_matches_saved_tensors(qk_norm, routes, checkpointing):
    """Text tokens pass every block and QK-norm keeps fp32 copies: without them the estimate was 17% low."""
    torch.manual_seed(0)
    net = MMDiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, text_dim=32,
                pooled_dim=24, text_len=24, qk_norm=qk_norm, init="xavier_all")
    if routes:
        net.attach_router(TokenRouter(list(routes)))
    net.grad_checkpointing = checkpointing
    net.train()
    b = 4
    mask = torch.ones(b, 24, dtype=torch.bool)
    mask[:, 10:] = False  # padded prompts: the joint attention is masked
    cond = TextCondition(torch.randn(b, 24, 32), mask, torch.randn(b, 24))
    measured = _saved_activation_bytes(net, torch.randn(b, 4, 16, 16), torch.rand(b), cond)
    estimate = activation_bytes(net, list(routes), b, 4, checkpointing, include_recompute=False)
    assert estimate == pytest.approx(measured, rel=0.1), (estimate, measured)


def test_flops_and_params_of_the_paper_model():
    cfg = load_config(REPO / "yamls" / "tread_xl2.yaml")
    report = dry_run(cfg, 8, "80GB")
    assert "parameters    674,816,272" in report and "fits" in report
    with torch.device("meta"):
        net = DiT(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    flops = model_flops(net, cfg.routes)
    assert flops.blocks_routed / flops.blocks_dense == pytest.approx(0.583, abs=0.002)
    assert 110e9 < flops.dense / 2 < 130e9  # ~119 GMACs per image (DiT paper: 118.6 Gflops, counted as MACs)


def test_sharding_shrinks_the_estimate():
    base = REPO / "yamls" / "tread_xl2.yaml"

    def total(*over):
        from tread_scale.parallel.memory import estimate_memory
        from tread_scale.factory import build_dit

        cfg = load_config(base, list(over))
        with torch.device("meta"):
            net = build_dit(cfg.model)
        return estimate_memory(cfg, net, 8, 32, gpu=True).training_state

    ddp = total()
    fsdp = total("parallelism.backend=fsdp")
    zero3 = total("parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=3")
    zero1 = total("parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=1")
    assert fsdp == pytest.approx(ddp / 8) and zero3 < zero1 < ddp


def test_dry_run_cli_and_its_errors(capsys):
    assert main(["dry-run", str(REPO / "yamls" / "tread_b2.yaml"), "parallelism.backend=fsdp", "--world-size", "16",
                 "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "fsdp over 16 rank(s): global batch 256, 16 per rank" in out and "memory/rank" in out
    assert "save/host     checkpoint " in out and "EMA export" in out
    assert main(["dry-run", str(REPO / "yamls" / "tread_b2.yaml"), "--world-size", "3"]) == 2
    assert "global_batch_size=256 is not divisible by the world size 3" in capsys.readouterr().err
    assert main(["dry-run", str(REPO / "yamls" / "tread_b2.yaml"), "parallelism.backend=fsdp",
                 "parallelism.fsdp.replicate=4", "train.global_batch_size=240", "--world-size", "6"]) == 2
    assert "replicate=4 does not divide the world size 6" in capsys.readouterr().err


def test_mmdit_projection_reduces_gradients_in_grad_reduce_dtype():
    """The projection reads ``parallelism.grad_reduce_dtype`` (not the retired ``fsdp.mixed_precision: pure``)."""
    from tread_scale.parallel.scaling import Assumptions

    def report(*over):
        cfg = load_config(REPO / "yamls" / "mmdit_8b_1024.yaml", list(over))
        return dry_run(cfg, 512, "80GB", projection=Assumptions(), max_nodes=64)

    # 8.05B parameters: gradients reduce-scattered in fp32 (32.2 GB) or bf16 (16.1 GB), parameters gathered in bf16
    zero3 = report()
    assert "reduce_scatter of gradients 32.20 GB" in zero3 and "all_gather of parameters for forward 16.10 GB" in zero3
    assert "reduce_scatter of gradients 16.10 GB" in report("parallelism.grad_reduce_dtype=bf16")
    fsdp = report("parallelism.backend=fsdp", "parallelism.deepspeed=null", "parallelism.grad_reduce_dtype=bf16")
    assert "reduce_scatter of gradients 16.10 GB" in fsdp and "+ 333 text tokens" in fsdp


def test_dry_run_counts_host_memory_of_a_checkpoint_save():
    """Saving under DeepSpeed writes each rank's EMA fragments (no rank gathers the EMA); DDP gathers it on
    every rank; the EMA export is streamed through rank 0 (about one tensor) under every backend."""
    from tread_scale.factory import build_dit
    from tread_scale.parallel.memory import GiB, estimate_memory

    base = REPO / "yamls" / "tread_xl2.yaml"

    def save(*over):
        cfg = load_config(base, list(over))
        with torch.device("meta"):
            net = build_dit(cfg.model)
        mem = estimate_memory(cfg, net, 8, 32, gpu=True)
        return mem.checkpoint_host, mem.export_host, sum(p.numel() for p in net.parameters() if p.requires_grad)

    ddp, export, p = save()
    assert ddp["ema"] == 4 * p and export < 0.02 * 4 * p  # the full EMA on every rank; export about one tensor
    zero3, export3, _ = save("parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=3")
    assert zero3["ema"] == export3 / 8 and zero3["engine"] == 4 * p / 8 and export3 == export
    fsdp, _, _ = save("parallelism.backend=fsdp")
    assert fsdp == {"ema": 4 * p / 8, "model_and_optimizer": 12 * p / 8}
    report = dry_run(load_config(base, ["parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=3"]), 8)
    line = next(l for l in report.splitlines() if l.startswith("save/host"))
    assert f"checkpoint {(zero3['ema'] + zero3['engine']) / GiB:.2f} GiB on the busiest rank" in line
    assert "EMA export" in line and "on rank 0 (streamed)" in line
