"""Leftover streaming shared memory of dead processes is removed; memory a live process maps is kept."""

import subprocess
import sys

from tread_scale.data.stream.shm import clean_dead_streaming_shm


def test_dead_prefixes_go_and_live_ones_stay(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in ("000007_locals", "000007_barrier", "000900_shard_states", "000901_resume", "sem.mp-abc", "other"):
        (shm / name).write_bytes(b"\0" * 4096)
    # /proc/<pid>/maps names the file by its path; a live process mapping 000901_resume keeps that prefix
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({str(shm / '000901_resume')!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0)\n"
        "print('mapped', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        removed = clean_dead_streaming_shm(str(shm))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(removed) == ["000007_barrier", "000007_locals", "000900_shard_states"]
    assert sorted(p.name for p in shm.iterdir()) == ["000901_resume", "other", "sem.mp-abc"]
