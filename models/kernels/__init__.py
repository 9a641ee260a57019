"""GPU kernels for the Infini-attention step (Triton), behind the torch custom ops of models/.

Why here (models/kernels/) and not runtime/: a kernel is another implementation
of what models/ computes -- the same function as ``models.memory.memory_reference``
plus local attention -- registered as the CUDA implementation of the model's
custom ops. Runners and the TensorRT plugin (export/trt_plugin.py) only call it.

Modules:
  triton_infini  the torch launchers of the Triton kernels (imports triton)
  triton_kernels the @triton.jit kernels themselves
  ops            the ``infini::attention`` custom op (reference + CUDA kernel) and
                 the CUDA kernel of ``infini::memory``; imports triton only when
                 a CUDA tensor first reaches them

Constraints (docs/gpu.md): d_head a power of two in 16..128; fp16, bf16 or fp32
activations; float32 state; any batch, heads and n >= 1 (partial segments masked).
"""

from __future__ import annotations

import functools
import os

from ...errors import MissingBackendError

SUPPORTED_DIMS = (16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (on a GPU, or on the CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def enabled() -> bool:
    """The kernels are used unless INFINI_TRITON=0 (e.g. to time the reference on a GPU)."""
    return os.environ.get("INFINI_TRITON", "1") != "0" and triton_available()


def supports(d_head: int) -> bool:
    return d_head in SUPPORTED_DIMS


def require_triton():
    """Import triton or raise MissingBackendError saying what to install."""
    if not triton_available():
        raise MissingBackendError("the fused Infini-attention kernels need triton: pip install 'infini-deploy[triton]' "
                                  "(and a CUDA GPU, or TRITON_INTERPRET=1 to run them on the CPU)")
    from . import triton_infini
    return triton_infini
