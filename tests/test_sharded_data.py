"""The DataLoader-backed real-data stream (``ShardedBatches``): sharded by accelerate across
processes, reshuffled per epoch, and continued where a checkpoint left it."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

from distilldiff.data import ShardedBatches

SCRIPT = r'''
import json, sys, torch
from accelerate import Accelerator
from distilldiff.data import ShardedBatches

acc = Accelerator(cpu=True)
rows = torch.arange(12).float()[:, None]
stream = ShardedBatches(rows, cond={"tag": torch.arange(12) * 10})
stream.prepare(acc, micro_batch=2, seed=3)
drawn = []
for _ in range(6):
    x, cond = stream(2, "cpu")
    assert torch.equal(cond["tag"], x[:, 0].long() * 10)
    drawn.append(x[:, 0].long().tolist())
resumed = ShardedBatches(rows)
resumed.prepare(acc, micro_batch=2, seed=3)
resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())) | {"batches_drawn": 4})
tail = [resumed(2, "cpu")[0][:, 0].long().tolist() for _ in range(2)]
with open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w") as f:
    json.dump({"drawn": drawn, "tail": tail, "per_epoch": stream.batches_per_epoch}, f)
'''


def test_two_processes_share_each_epoch_and_resume_mid_stream(tmp_path):
    """2 CPU processes (gloo), 12 rows, 2 per batch: each epoch is 3 batches per process; the two
    processes' rows of an epoch are disjoint and cover the data once; epochs differ in order;
    a stream resumed after 4 batches continues with the 5th and 6th."""
    script = tmp_path / "shards.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    out = {p: json.loads((tmp_path / f"rank{p}.json").read_text()) for p in (0, 1)}
    assert out[0]["per_epoch"] == out[1]["per_epoch"] == 3
    for epoch in range(2):
        rows = [sum(out[p]["drawn"][3 * epoch: 3 * epoch + 3], []) for p in (0, 1)]
        assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(12)), rows
    assert out[0]["drawn"][:3] != out[0]["drawn"][3:]
    for p in (0, 1):
        assert out[p]["tail"] == out[p]["drawn"][4:6]


def test_drawing_batches_leaves_the_global_rng_alone():
    from accelerate import Accelerator

    stream = ShardedBatches(torch.arange(10).float()[:, None])
    stream.prepare(Accelerator(cpu=True), micro_batch=3, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    for _ in range(7):  # across an epoch boundary (3 batches per epoch, the last row dropped)
        stream(3, "cpu")
    assert torch.equal(torch.rand(4), expected)
    assert stream.state_dict() == {"batches_drawn": 7}
