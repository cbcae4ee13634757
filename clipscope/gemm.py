"""Dense fp32 products, ``x @ weight.T + bias``, through the fastest kernel torch has on the CPU.

On the CPU, torch's ``F.linear`` calls MKL's SGEMM. On the AMD EPYC machines this project runs on,
MKL takes its generic code path and oneDNN's matmul (which torch ships and dispatches to for its
own fused CPU kernels) is faster: about 1.8x at the SAE encoder's study shape (``[64, 768] x
[768, 49152]``), 1.2x at batch 4,096, and 1.1-1.5x at the shapes of CLIP's blocks (``bench/train_step.py``
and ``bench/clip_forward.py`` print which kernel ran). Both compute the same fp32 product; only the
summation order differs, within float rounding. Its users: the SAE encoder, the neighbour search's
similarities and CLIP's blocks (``clipscope/clip/cpu_blocks.py``).

The kernel is the setting ``cpu_gemm`` (``CLIPSCOPE_CPU_GEMM``), fixed for the process and never
chosen by timing, so a resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from clipscope.settings import get_settings


@lru_cache(maxsize=1)
def cpu_kernel() -> str:
    """Which kernel :func:`linear` uses for fp32 CPU tensors: ``onednn``, or ``mkl`` (``F.linear``) when
    so configured or when this torch lacks oneDNN's linear."""
    if get_settings().cpu_gemm == "mkl" or not torch.backends.mkldnn.is_available():
        return "mkl"
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "none", [], "")
    except (AttributeError, RuntimeError):  # a torch without the op
        return "mkl"
    return "onednn" if torch.equal(out, torch.full((2, 4), 3.0)) else "mkl"


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x``; oneDNN on the CPU in fp32 where nothing needs autograd."""
    fast = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 2 and weight.is_contiguous()
    if fast and not needs_graph(x, weight, bias) and cpu_kernel() == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
