import numpy as np
import pytest
import torch

from tread_scale.errors import CheckpointError
from tread_scale.evaluation.inception import FIDInception, load_inception, save_inception
from tread_scale.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from tread_scale.parallel.process_group import leave_process_group


def test_stats_match_numpy_and_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    stats = FeatureStats(16)
    for chunk in np.array_split(feats, 7):
        stats.update(torch.from_numpy(chunk))
    mu, cov = stats.mean_cov()
    assert np.allclose(mu, feats.mean(0), atol=1e-12) and np.allclose(cov, np.cov(feats, rowvar=False), atol=1e-10)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_fid_between_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # a rotated (non-diagonal) pair: FID is invariant to a common rotation
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    assert frechet_distance(q @ m1, q @ np.diag(a) @ q.T, q @ m2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-6)


def _rank_worker(rank, store, feats, out):
    from datetime import timedelta

    import torch.distributed as dist

    # a file store: no TCP port to race for; a bounded timeout turns a stuck peer into an error
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    stats = FeatureStats(feats.shape[1])
    stats.update(torch.from_numpy(feats[rank::2]))
    stats.all_reduce()
    if rank == 0:
        mu, cov = stats.mean_cov()
        np.savez(out, mu=mu, cov=cov, n=stats.n)
    leave_process_group()


def test_two_rank_statistics_equal_one_process(tmp_path):
    feats = np.random.default_rng(2).standard_normal((101, 12))
    torch.multiprocessing.spawn(_rank_worker, args=(tmp_path / "store", feats, tmp_path / "s.npz"), nprocs=2)
    got = np.load(tmp_path / "s.npz")
    single = FeatureStats(12)
    single.update(torch.from_numpy(feats))
    mu, cov = single.mean_cov()
    assert int(got["n"]) == 101
    assert np.allclose(got["mu"], mu, atol=1e-12) and np.allclose(got["cov"], cov, atol=1e-12)
    ref_fid = frechet_distance(mu, cov, np.zeros(12), np.eye(12))
    assert frechet_distance(got["mu"], got["cov"], np.zeros(12), np.eye(12)) == pytest.approx(ref_fid, rel=1e-9)


def test_inception_score_and_precision_recall_limits():
    uniform = torch.zeros(50, 1008)
    assert inception_score(uniform, split_size=10)[0] == pytest.approx(1.0)
    confident = torch.full((1000, 1008), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 50.0
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-3)  # one split of 1000
    x = torch.randn(200, 8)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    far = x + 100.0
    assert precision_recall(x, far) == (0.0, 0.0)


def test_inception_weights_round_trip_bitwise(tmp_path):
    torch.manual_seed(0)
    model = FIDInception().eval()
    path = save_inception(model, tmp_path / "inception.safetensors")
    loaded = load_inception(path)
    images = torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8)
    a, b = model(images), loaded(images)
    assert a["pool"].shape == (3, 2048) and a["logits"].shape == (3, 1008) and a["spatial"].shape == (3, 2023)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same weights as a .pth state dict load too
    torch.save(model.net.state_dict(), tmp_path / "inception.pth")
    assert torch.equal(load_inception(tmp_path / "inception.pth")(images)["pool"], a["pool"])


def test_inception_refuses_pickled_models_and_missing_files(tmp_path):
    torch.save(FIDInception(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickled models are refused"):
        load_inception(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        load_inception(tmp_path / "missing.pth")
