"""``tread-scale dry-run`` with aspect-ratio buckets: per-bucket lines, a plan sized for the largest bucket."""

import re

import pytest
import torch

from tread_scale.cli import main
from tread_scale.config import config_from_dict, dump_config, load_config
from tread_scale.data.conversion.buckets import CROP_RULE
from tread_scale.data.metadata import META_FILE, LatentMetadata
from tread_scale.devtools.synthetic import write_bucketed_latents
from tread_scale.errors import ConfigError
from tread_scale.factory import build_net
from tread_scale.models.flops import model_flops
from tread_scale.parallel.memory import GiB, estimate_memory
from tread_scale.parallel.plan import buckets_from_spec, dry_run
from tread_scale.parallel.scaling import Assumptions

from tests.conftest import REPO, tiny_model_cfg, tiny_run_cfg

#: A depth-4, width-64 MMDiT on 4x8x8 latents, patch 2 (16 image tokens) with 8 text tokens.
TINY_MMDIT = tiny_model_cfg(family="mmdit", text_dim=32, pooled_dim=16, text_len=8)


def _cfg(tmp_path, remote="s3://bucket/data", **model):
    """A validated tiny MMDiT run (a DiT with ``family="dit"``) on ``remote``, also written as ``tmp_path/c.yaml``."""
    cfg = config_from_dict(tiny_run_cfg(remote, tmp_path, model={**TINY_MMDIT, **model}))
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    return cfg


def _net(cfg):
    with torch.device("meta"):
        return build_net(cfg.model)


def _bucket_line(report: str, pixels: str) -> str:
    return next(line for line in report.splitlines() if re.match(rf"  bucket +{pixels} px ", line))


def _total(report: str) -> str:
    return next(line for line in report.splitlines() if line.lstrip().startswith("total "))


def test_each_bucket_gets_its_line_with_its_tokens_flops_and_memory(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    assert main(["dry-run", str(tmp_path / "c.yaml"), "--world-size", "2", "--buckets", "64x64,96x32"]) == 0
    report = capsys.readouterr().out
    assert "buckets       2 from --buckets 64x64,96x32 (sizes W x H; latents 8x smaller: an 8x VAE); forward" in report
    net = _net(cfg)
    for pixels, latent, hw, tokens in (("64x64", "8x8", (8, 8), 16), ("96x32", "12x4", (4, 12), 12)):
        line = _bucket_line(report, pixels)
        flops = model_flops(net, cfg.routes, latent_hw=hw)
        memory = estimate_memory(cfg, net, 2, 4, False, num_tokens=tokens).total
        assert re.search(rf"latent +{latent} +{tokens} tokens  forward {flops.dense / 1e9:.2f} / "
                         rf"{flops.routed / 1e9:.2f} GFLOP  memory {memory / GiB:.2f} GiB$", line), line
    assert "sized for     bucket 64x64 px: the most image tokens, 16 (as many as the configured model.input_size 8's)" \
        in report


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_without_num_tokens_is_the_configured_sizes(tmp_path, backend, checkpointing):
    cfg = _cfg(tmp_path)
    cfg = load_config(tmp_path / "c.yaml", [f"parallelism.backend={backend}",
                                            f"parallelism.activation_checkpointing={str(checkpointing).lower()}"])
    net = _net(cfg)
    default = estimate_memory(cfg, net, 2, 4, True)
    assert estimate_memory(cfg, net, 2, 4, True, num_tokens=None).terms == default.terms
    assert estimate_memory(cfg, net, 2, 4, True, num_tokens=net.num_tokens).terms == default.terms
    more = estimate_memory(cfg, net, 2, 4, True, num_tokens=2 * net.num_tokens)
    assert more.terms["activations"] > default.terms["activations"] and more.total > default.total


def test_recipe_memory_is_unchanged_and_its_plan_is_sized_for_its_largest_bucket():
    cfg = load_config(REPO / "yamls" / "mmdit_2b_512.yaml")
    plain = dry_run(cfg, 64, "80GB")
    assert "total 36.98 GiB" in plain  # docs/performance.md's figure, before buckets existed
    assert dry_run(cfg, 64, "80GB", buckets=None) == plain
    report = dry_run(cfg, 64, "80GB", choose=Assumptions(), buckets=buckets_from_spec("512px:64"))
    assert len(re.findall(r"^  bucket ", report, re.M)) == 17
    assert "memory 36.98 GiB" in _bucket_line(report, "512x512")
    assert ("sized for     bucket 896x320 px: the most image tokens, 1120 (more than the configured "
            "model.input_size 64's 1024)") in report
    assert "total 39.15 GiB" in _total(report) and "fits (49% of it" in report
    assert "-> micro-batch  16, no checkpointing           39.15 GiB" in report  # --choose plans the same bucket


def test_plan_is_sized_for_the_bucket_with_more_tokens_than_the_configured_size(tmp_path):
    _cfg(tmp_path)
    cfg = load_config(tmp_path / "c.yaml", ["train.global_batch_size=2048"])  # 1024 per rank: GiB to compare
    net = _net(cfg)
    plain = dry_run(cfg, 2, "80GB", choose=Assumptions())
    report = dry_run(cfg, 2, "80GB", choose=Assumptions(), buckets=buckets_from_spec("64x64,96x64"))
    assert re.search(r"bucket +96x64 px +latent +12x8 +24 tokens", report)
    assert "sized for     bucket 96x64 px: the most image tokens, 24 (more than the configured model.input_size " \
           "8's 16); the memory plan below uses them" in report
    sized = estimate_memory(cfg, net, 2, 1024, True, num_tokens=24).total
    assert sized > 1.2 * estimate_memory(cfg, net, 2, 1024, True).total
    assert f"total {sized / GiB:.2f} GiB" in _total(report) and _total(report) != _total(plain)
    chosen = next(line for line in report.splitlines() if line.startswith("  -> "))
    assert chosen.startswith("  -> micro-batch 1024, no checkpointing") and f"{sized / GiB:.2f} GiB" in chosen
    # buckets no larger than the configured size leave the plan as it was
    small = dry_run(cfg, 2, "80GB", choose=Assumptions(), buckets=buckets_from_spec("64x64,96x32"))
    assert small.split("\nplan ")[1] == plain.split("\nplan ")[1]
    smaller = dry_run(cfg, 2, buckets=buckets_from_spec("32x32"))
    assert ("sized for     the configured model.input_size 8: 16 image tokens, more than any bucket's (the most: "
            "32x32 px, 4)") in smaller


def test_a_bucket_the_patch_does_not_divide_is_refused_by_name(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"--buckets 64x64,72x64: bucket 72x64 px has a 9x8 latent \(W x H\), "
                                          r"whose sides the model's patch 2 does not divide \(latent sides must be "
                                          r"multiples of 2, pixel sides multiples of 16\)"):
        dry_run(cfg, 2, buckets=buckets_from_spec("64x64,72x64"))
    assert main(["dry-run", str(tmp_path / "c.yaml"), "--world-size", "2", "--buckets", "60x64"]) == 2
    assert "--buckets '60x64': entry '60x64': side 60 is not a multiple of 8" in capsys.readouterr().err


def _bucketed_dataset(root) -> None:
    """A DiT dataset of two buckets, 64x64 px (8x8 latents) and 96x32 px (4x12), with its metadata."""
    buckets = write_bucketed_latents(root, [((4, 8, 8), 3), ((4, 4, 12), 2)])
    for b, size in zip(buckets, ([64, 64], [32, 96])):
        b["image_size"] = size  # [H, W] pixels, as a conversion records them
    meta = LatentMetadata(latent_shape=(4, 8, 8), num_classes=3, num_samples=5, vae="sd-vae", buckets=buckets,
                          bucket_spec="64x64,96x32", crop_rule=CROP_RULE)
    (root / META_FILE).write_text(meta.to_json())


def test_a_local_bucketed_dataset_is_planned_with_its_buckets(tmp_path, capsys):
    data = tmp_path / "data"
    _bucketed_dataset(data)
    _cfg(tmp_path, str(data), family="dit", text_dim=None, pooled_dim=None, text_len=None)
    assert main(["dry-run", str(tmp_path / "c.yaml"), "--world-size", "2"]) == 0
    report = capsys.readouterr().out
    assert f"buckets       2 from data.remote={data} (sizes W x H); forward GFLOP" in report
    assert re.search(r"bucket +64x64 px +latent +8x8 +16 tokens", report)
    assert re.search(r"bucket +96x32 px +latent +12x4 +12 tokens", report)
    # --buckets plans other buckets than the dataset's
    assert main(["dry-run", str(tmp_path / "c.yaml"), "--world-size", "2", "--buckets", "96x64"]) == 0
    report = capsys.readouterr().out
    assert "from --buckets 96x64" in report and "data.remote=" not in report


@pytest.mark.parametrize("recipe, spec, largest, total", [("mmdit_2b_256.yaml", "256px:32", "448x160", "38.68"),
                                                           ("mmdit_2b_1024.yaml", "1024px:64", "1920x576", "56.59")])
def test_bucketed_recipes_fit_as_their_headers_state(recipe, spec, largest, total):
    cfg = load_config(REPO / "yamls" / recipe, ["model.init_from=null"])
    report = dry_run(cfg, 64, "80GB", choose=Assumptions(), buckets=buckets_from_spec(spec))
    assert f"sized for     bucket {largest} px" in report and f"total {total} GiB" in _total(report)
    assert "fits" in report and "(the config has" not in report  # the recipe uses the plan's choice
