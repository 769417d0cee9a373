"""fuseformer modules under DistributedDataParallel and FSDP (fully_shard) with gloo, 2 CPU
processes: gradients match a single-process run on the whole batch."""

import socket
import subprocess
import sys

import pytest
import torch

import fuseformer

MODEL = """
import torch, fuseformer

class Block(torch.nn.Module):
    # fuseformer.nn's norms, causal self-attention and fused linear layers (C++ CPU kernels).
    def __init__(self):
        super().__init__()
        self.proj = fuseformer.nn.LinearAct(16, 32, activation="gelu")
        self.norm = fuseformer.nn.LayerNorm(32)
        self.attn = fuseformer.nn.MultiheadAttention(32, 2, batch_first=True)
        self.mlp = fuseformer.nn.GatedMLP(32, 48)
        self.out_norm = fuseformer.nn.RMSNorm(32)

    def forward(self, x):
        h = self.norm(self.proj(x))
        a, _ = self.attn(h, h, h, need_weights=False, is_causal=True)
        h = h + a
        return self.out_norm(h + self.mlp(h))

def make_model():
    torch.manual_seed(0)
    return Block()
"""

WORKER = MODEL + """
import os, sys, torch.distributed as dist
rank, world, port, folder, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
batch = torch.load(f"{folder}/batch.pt")
if mode == "ddp":
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    model(batch.chunk(world)[rank]).square().mean().backward()
    grads = {n: p.grad for n, p in model.module.named_parameters()}
else:  # FSDP2: parameters and gradients sharded over the ranks (DTensors)
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    fully_shard(model)
    model(batch.chunk(world)[rank]).square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
if rank == 0:
    torch.save(grads, f"{folder}/grads.pt")
# Both ranks reach the teardown together: a rank that closes its gloo pairs while the other
# is still busy can abort the other ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
# Skip C++ static destructors at interpreter exit: a gloo/TCPStore thread torn down there
# aborts now and then ("terminate called without an active exception"), after the work is done.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradients_match_single_process(tmp_path, mode):
    batch = torch.randn(8, 5, 16)
    torch.save(batch, tmp_path / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(port), str(tmp_path), mode],
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
    assert isinstance(reference.attn, fuseformer.nn.MultiheadAttention)
    # Both average the per-shard mean losses: the same as the mean over the whole batch.
    reference(batch).square().mean().backward()
    assert set(grads) == {name for name, _ in reference.named_parameters()}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
