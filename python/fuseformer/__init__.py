"""fuseformer: fused Transformer kernels (Triton, C++ CPU, CUDA) behind PyTorch-shaped APIs.

    import fuseformer
    y = fuseformer.ops.layer_norm(x, (4096,), w, b)      # like F.layer_norm
    norm = fuseformer.nn.RMSNorm(4096)                    # like torch.nn.RMSNorm
    with fuseformer.use_backend("triton"): ...            # force a backend
    fuseformer.info()                                     # what runs here
    model = fuseformer.models.GPT(fuseformer.models.GPTConfig.gpt2_small())
"""

from fuseformer import backends, nn, ops
from fuseformer import models  # after nn and ops, which the models use
from fuseformer._extension import cpu_cache_bytes, empty_cpu_cache
from fuseformer._info import info
from fuseformer.accelerate import AccelerateReport, accelerate
from fuseformer.backends import BackendUnavailableError, available_backends, use_backend
from fuseformer.quantize import QuantizeReport, quantize

__version__ = "0.1.0"

__all__ = [
    "AccelerateReport",
    "BackendUnavailableError",
    "accelerate",
    "available_backends",
    "backends",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "info",
    "models",
    "nn",
    "ops",
    "quantize",
    "QuantizeReport",
    "use_backend",
]
