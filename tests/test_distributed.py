"""fuseformer modules under DistributedDataParallel (gloo, 2 CPU processes): gradients match
a single-process run on the whole batch."""

import socket
import subprocess
import sys

import torch

import fuseformer

MODEL = """
import torch, fuseformer
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), fuseformer.nn.LayerNorm(32),
                               torch.nn.Linear(32, 32), fuseformer.nn.RMSNorm(32))
"""

WORKER = MODEL + """
import os, sys, torch.distributed as dist
rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
model = torch.nn.parallel.DistributedDataParallel(make_model())
batch = torch.load(f"{folder}/batch.pt")
model(batch.chunk(world)[rank]).square().mean().backward()
if rank == 0:
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, f"{folder}/grads.pt")
# Both ranks reach the teardown together: a rank that closes its gloo pairs while the other
# is still busy can abort the other ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
# Skip C++ static destructors at interpreter exit: a gloo/TCPStore thread torn down there
# aborts now and then ("terminate called without an active exception"), after the work is done.
sys.stdout.flush()
os._exit(0)
"""


def test_ddp_gradients_match_single_process(tmp_path):
    batch = torch.randn(8, 16)
    torch.save(batch, tmp_path / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(port), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-3000:]
    grads = torch.load(tmp_path / "grads.pt")
    namespace = {}
    exec(MODEL, namespace)
    reference = namespace["make_model"]()
    assert isinstance(reference[1], fuseformer.nn.LayerNorm)
    # DDP averages the per-shard mean losses: the same as the mean over the whole batch.
    reference(batch).square().mean().backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
