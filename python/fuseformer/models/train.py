"""Train a reference model on both backends from the same initial weights and batches, and
compare the loss curves (``fuseformer train``): the check that the fused kernels train like
plain PyTorch over a few hundred steps, on data that ships with the package.

    fuseformer train gpt --steps 300 --out DIR      # byte-level LM on synthetic_corpus()
    fuseformer train resnet --steps 300 --out DIR   # 4-class synthetic_images()
    fuseformer train lstm --steps 300 --out DIR     # byte-level LSTM LM on synthetic_corpus()

Writes DIR/train_<model>.json (both curves, timings, settings), .md (summary) and .png (plot).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.models.cnn import ResNet, ResNetConfig, synthetic_images
from fuseformer.models.data import ByteTokenizer, synthetic_corpus, text_batches
from fuseformer.models.rnn import LSTMConfig, LSTMLanguageModel
from fuseformer.models.transformer import GPT, GPTConfig

MODELS = ("gpt", "resnet", "lstm")


def _gpt_run(backend: str, steps: int, device: str, seed: int) -> list[float]:
    tokens = ByteTokenizer.encode(synthetic_corpus(200_000, seed=seed))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=4, n_embd=128), backend=backend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for x, y in text_batches(tokens, 16, 128, steps, seed=seed + 1, device=device):
        _, loss = model(x, y, return_logits=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _lstm_run(backend: str, steps: int, device: str, seed: int) -> list[float]:
    tokens = ByteTokenizer.encode(synthetic_corpus(200_000, seed=seed))
    torch.manual_seed(seed)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=256, embed_dim=128, hidden_size=128, num_layers=2),
                              backend=backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # The LSTM kernels forced on the fuseformer side: unforced, a dense float32 LSTM on the CPU
    # runs torch's own (the measured faster one), and the curve would not be the kernels'.
    kernel = backends.DEFAULTS["lstm"][device][0] if backend == "fuseformer" else "torch"
    losses = []
    with fuseformer.use_backend(kernel):
        for x, y in text_batches(tokens, 16, 64, steps, seed=seed + 1, device=device):
            _, loss, _ = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    return losses


def _resnet_run(backend: str, steps: int, device: str, seed: int) -> list[float]:
    images, labels = synthetic_images(4096, size=32, seed=seed)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = labels.to(device)
    torch.manual_seed(seed)
    model = ResNet(ResNetConfig(layers=(1, 1, 1, 1), num_classes=4, stem="cifar", width=16), backend=backend).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (64,), generator=gen).to(device)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def compare(model: str, steps: int, out_dir: Path, device: str | None = None, seed: int = 0) -> dict:
    """Train ``model`` for ``steps`` on both backends; write and return the comparison."""
    if model not in MODELS:
        raise ValueError(f"fuseformer train: model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"fuseformer train: steps must be an int >= 2, got {steps!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = {"gpt": _gpt_run, "resnet": _resnet_run, "lstm": _lstm_run}[model]
    curves, seconds = {}, {}
    for backend in ("torch", "fuseformer"):
        start = time.perf_counter()
        curves[backend] = run(backend, steps, device, seed)
        seconds[backend] = time.perf_counter() - start
    ref, ours = curves["torch"], curves["fuseformer"]
    window = max(1, steps // 10)
    summary = {
        "model": model, "steps": steps, "device": device, "seed": seed,
        "first_loss": {b: sum(c[:window]) / window for b, c in curves.items()},
        "last_loss": {b: sum(c[-window:]) / window for b, c in curves.items()},
        "max_relative_gap": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, ours)),
        "seconds": seconds, "curves": curves,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"train_{model}.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Training {model} on both backends ({steps} steps, {device}, seed {seed})", "",
        "| backend | loss, first 10% | loss, last 10% | time (s) |", "|---|---|---|---|",
    ]
    for b in curves:
        lines.append(f"| {b} | {summary['first_loss'][b]:.4f} | {summary['last_loss'][b]:.4f} | {seconds[b]:.1f} |")
    lines += ["", f"Largest per-step relative gap between the curves: {summary['max_relative_gap']:.2e}.", ""]
    (out_dir / f"train_{model}.md").write_text("\n".join(lines))
    _plot(curves, out_dir / f"train_{model}.png", f"{model}: training loss, both backends")
    return summary


def _plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for backend, curve in curves.items():
        ax.plot(curve, label=backend, linestyle="-" if backend == "torch" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
