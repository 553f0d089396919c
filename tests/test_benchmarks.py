"""The benchmark scripts run end to end (tiny sizes, CPU) and print their machine-readable last line."""

import re
import subprocess
import sys

from tests.conftest import REPO


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_bench_step_prints_both_ratios():
    out = _run("benchmarks/bench_step.py", "--model", "S/8", "--batch", "2", "--pairs", "2", "--warmup", "1",
               "--reference")
    m = re.fullmatch(r"measured_ratio=([\d.]+) flop_ratio=([\d.]+)", out[-1])
    assert m and 0 < float(m.group(1)) < 2 and 0.5 < float(m.group(2)) < 1
    assert re.fullmatch(r"ours_vs_reference=[\d.]+", out[-3])


def test_bench_step_times_an_mmdit_with_padded_text():
    out = _run("benchmarks/bench_step.py", "--model", "MMDiT-T/2", "--depth", "6", "--input-size", "16",
               "--text-len", "16", "--batch", "2", "--pairs", "2", "--warmup", "1")
    assert out[0].startswith("model=MMDiT-T/2 depth=6 width=64 tokens=64 +16 text") and "route=2->2@0.5" in out[0]
    m = re.fullmatch(r"measured_ratio=([\d.]+) flop_ratio=([\d.]+)", out[-1])
    assert m and 0 < float(m.group(1)) < 2 and 0.5 < float(m.group(2)) < 1


def test_bench_data_compares_mds_and_per_file_reads(tmp_path):
    last = _run("benchmarks/bench_data.py", "--samples", "600", "--batch", "64", "--workers", "0", "--passes", "1",
                "--dir", str(tmp_path))[-1]
    m = re.fullmatch(r"mds_per_s=(\d+) npy_per_s=(\d+) ratio=([\d.]+) steady_ratio=([\d.]+)", last)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0


def test_bench_buckets_compares_bucketed_and_square_loading(tmp_path):
    out = _run("benchmarks/bench_buckets.py", "--samples", "600", "--batch", "64", "--workers", "0", "--passes", "1",
               "--dir", str(tmp_path))
    m = re.fullmatch(r"square_per_s=(\d+) bucketed_per_s=(\d+) ratio=([\d.]+) token_ratio=([\d.]+)", out[-1])
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0


def test_gpu_bench_code_paths_run_on_cpu():
    out = _run("benchmarks/gpu_bench.py", "--cpu-smoke", "--model", "S/8", "--batch", "2", "--warmup", "1",
               "--steps", "1", "--variants", "dense,tread,reference,tread+fsdp2", "--peak-tflops", "1")
    assert out[-1].startswith("RESULT dense:img_s=") and "tread+fsdp2:img_s=" in out[-1]
    assert any(line.startswith("tread/dense step time (eager):") for line in out)
    assert any(line.startswith("tread/reference step time (eager):") for line in out)
