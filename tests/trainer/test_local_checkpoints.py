"""Setting aside checkpoints newer than the latest pointer (a run killed between the two writes)."""

import os

from tread_scale.trainer.checkpointing.local import batch_of, set_aside_orphans


def test_newer_than_latest_is_moved_aside_and_kept(tmp_path):
    for b in (2, 4, 6):
        (tmp_path / f"ep0-ba{b}-rank0.pt").write_bytes(b"x" * b)
    os.symlink("ep0-ba4-rank0.pt", tmp_path / "latest-rank0.pt")
    moved = set_aside_orphans(tmp_path)
    assert [p.name for p in moved] == ["ep0-ba6-rank0.pt"]
    assert (tmp_path / "orphaned" / "ep0-ba6-rank0.pt").read_bytes() == b"x" * 6
    assert sorted(p.name for p in tmp_path.glob("ep*.pt")) == ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt"]
    (tmp_path / "ep0-ba6-rank0.pt").write_bytes(b"again")  # a second orphan of the same name is kept too
    set_aside_orphans(tmp_path)
    assert len(list((tmp_path / "orphaned").iterdir())) == 2


def test_without_a_pointer_every_checkpoint_is_an_orphan(tmp_path):
    (tmp_path / "ep0-ba2-rank0.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("kept")
    assert [p.name for p in set_aside_orphans(tmp_path)] == ["ep0-ba2-rank0.pt"]
    assert (tmp_path / "notes.txt").exists()
    assert set_aside_orphans(tmp_path / "missing") == []
    assert batch_of("s3/x/ep3-ba120-rank1.pt") == 120 and batch_of("latest-rank0.pt") == -1
