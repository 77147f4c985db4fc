"""tools/bench.py --quick runs end to end and prints its table with a ratio column, and LiveBytes counts
the memory of live tensors. (No timing assertions: speed is what bench.py reports, not what a test on
a shared CPU can promise.)"""
import os
import subprocess
import sys
from pathlib import Path

import torch

from tools import bench

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_prints_a_table_with_ratios():
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--threads", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "ours/ref" in lines[1]
    rows = {line[:44].strip(): line[44:].split() for line in lines[2:] if line.strip()}
    for name in ["LLaMA prefill", "LLaMA decode, per token", "LLaMA decode, static cache", "CLIP image encoding",
                 "UNet step", "VAE decode", "DDIM sampling"]:
        (row,) = [v for k, v in rows.items() if k.startswith(name + " (") or k == name]
        ours, ref, ratio = (float(x) for x in row[:3])  # every compared row has both timings and their ratio
        assert ours > 0 and ref > 0 and abs(ratio - ours / ref) < 0.01 + 0.01 * ratio, row
    (train_row,) = [v for k, v in rows.items() if k.startswith("DreamLLM training step")]
    assert float(train_row[0]) > 0 and train_row[1:3] == ["-", "-"]  # ours only
    toy = [k for k in rows if k.startswith("toy stage I-creation step")] + \
        [k for k in rows if k in ("VAE encoder (frozen, no grad)", "LLM forward + backward to the queries",
                                  "null condition forward + backward", "UNet forward + backward")]
    assert len(toy) == 5 and all(float(rows[k][0]) > 0 and rows[k][1:3] == ["-", "-"] for k in toy)


def test_help():
    r = subprocess.run([sys.executable, "-m", "tools.bench", "-h"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--real-shapes" in r.stdout and "--quick" in r.stdout


def test_live_bytes_counts_the_peak_of_live_tensors_once_per_storage():
    with bench.LiveBytes() as live:
        before = live.now  # what was alive already counts too
        a = torch.ones(1024, 256)  # 1 MiB
        b = torch.ones(1024, 512)  # 2 MiB: 3 MiB alive
        del a, b
        c = torch.ones(1024, 512)  # 2 MiB again, after the 3 MiB were freed
        view = c.view(-1)  # shares c's storage: nothing more
        now = live.now
    assert live.peak - before == 3 * 2**20 and now - before == 2 * 2**20
    del c, view
