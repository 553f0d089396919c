"""Issue 12: the barriers at the start and end of training are bounded and name the ranks that did not arrive."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

_RANK = textwrap.dedent("""
    import datetime, os, sys, time
    import torch.distributed as dist
    from tread_scale.errors import DistributedTimeoutError
    from tread_scale.parallel.process_group import bounded_barrier
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    bounded_barrier("start of training", 60)  # both arrive
    if rank == 1:
        time.sleep(8)  # stuck: never reaches the end
        os._exit(0)
    try:
        bounded_barrier("end of training", 2)
    except DistributedTimeoutError as e:
        print("ERROR", e, flush=True)
        os._exit(3)
    os._exit(0)
""")


def test_barrier_names_the_rank_that_did_not_arrive(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store")],
                              env={**os.environ, "RANK": str(r), "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (out, err), _ = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 3, out + err[-3000:]
    assert "barrier at the end of training timed out after 2 s (train.barrier_timeout)" in out
    assert "rank 0" in out and "Ranks 1 failed" in out, out
    assert "most recent call first" in err
