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


def run_two_ranks(script: str, tmp_path, *extra: str, timeout: float = 180) -> None:
    """Run ``script`` as ranks 0 and 1 (argv: rank, world, port, folder, *extra); both must succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(r), "2", str(port), str(tmp_path), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradients_match_single_process(tmp_path, mode):
    batch = torch.randn(8, 5, 16)
    torch.save(batch, tmp_path / "batch.pt")
    run_two_ranks(WORKER, tmp_path, mode)
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


TRAIN_WORKER = """
import os, sys, torch, torch.distributed as dist
rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
model = torch.nn.parallel.DistributedDataParallel(make_model())
opt = make_optimizer(model)
data = torch.load(f"{folder}/data.pt")
losses = []
for step in range(data[0].shape[0]):
    loss = loss_of(model, *(d[step].chunk(world)[rank] for d in data))
    opt.zero_grad()
    loss.backward()
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)
if rank == 0:
    torch.save(losses, f"{folder}/losses.pt")
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""

# Per model: make_model(), make_optimizer(model), loss_of(model, *inputs). ResNet trains its
# BatchNorm on each rank's half of the batch (SyncBatchNorm is GPU-only), so the
# single-process reference below averages the losses of the two halves, as DDP averages the
# ranks' gradients; for the GPT that equals the whole batch's loss.
TRAIN_MODELS = {
    "gpt": """
import torch
from fuseformer.models import GPT, GPTConfig
def make_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=32), backend="fuseformer")
def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3)
def loss_of(model, x, y):
    return model(x, y)[1]
""",
    "resnet": """
import torch, torch.nn.functional as F
from fuseformer.models import ResNet, ResNetConfig
def make_model():
    torch.manual_seed(0)
    return ResNet(ResNetConfig(layers=(1, 1, 1, 1), num_classes=4, stem="cifar", width=8), backend="fuseformer")
def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)
""",
}
TRAIN_STEPS = 8


def _training_data(model: str):
    from fuseformer.models import ByteTokenizer, synthetic_corpus, synthetic_images, text_batches

    if model == "gpt":
        tokens = ByteTokenizer.encode(synthetic_corpus(5000, seed=1))
        batches = list(text_batches(tokens, 8, 32, steps=TRAIN_STEPS, seed=2))
        return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    images, labels = synthetic_images(TRAIN_STEPS * 8, size=16, seed=1)
    return images.view(TRAIN_STEPS, 8, *images.shape[1:]), labels.view(TRAIN_STEPS, 8)


@pytest.mark.parametrize("model", ["gpt", "resnet"])
def test_model_trains_under_ddp_like_one_process(tmp_path, model):
    data = _training_data(model)
    torch.save(data, tmp_path / "data.pt")
    run_two_ranks(TRAIN_MODELS[model] + TRAIN_WORKER, tmp_path, timeout=300)
    ddp_losses = torch.load(tmp_path / "losses.pt")

    namespace = {}
    exec(TRAIN_MODELS[model], namespace)
    net = namespace["make_model"]()
    opt = namespace["make_optimizer"](net)
    single = []
    for step in range(TRAIN_STEPS):
        halves = [namespace["loss_of"](net, *chunk) for chunk in zip(*(d[step].chunk(2) for d in data))]
        loss = sum(halves) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        single.append(loss.item())
    assert single[-1] < single[0], single
    for step, (a, b) in enumerate(zip(single, ddp_losses)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: one process {a:.6f}, DDP {b:.6f}"
