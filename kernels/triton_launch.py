"""What launching a ``@triton.jit`` kernel needs: compiled on CUDA, interpreted on the CPU.

Triton (3.9) decides between compiling and interpreting when ``@triton.jit`` decorates a
function: it reads ``TRITON_INTERPRET`` at that moment and returns a ``JITFunction`` or an
``InterpretedFunction``; nothing reads the variable at launch. Triton's own helpers
(``tl.zeros``, ``tl.max``, ``tl.sum``...) are decorated when ``triton.language`` is imported, and
an interpreted kernel cannot call compiled helpers. So the interpreter is all or nothing per
process: ``TRITON_INTERPRET=1`` must be in the environment before anything imports triton
(transformers and peft may). :func:`check_launchable` says so instead of failing mid-kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs through the Triton interpreter."""
    return isinstance(kernel, InterpretedFunction)


def check_device(device: torch.device) -> None:
    """Checks that Triton kernels can run on ``device`` in this process: on CUDA always (an
    interpreted kernel copies its tensors to the host and back), on the CPU only with the
    interpreter enabled.

    Raises:
        ValueError: the CPU while triton compiles (saying how to enable the interpreter), or a
            device that is neither CUDA nor the CPU.
    """
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"Triton kernels run on CUDA or (interpreted) on the CPU, not {device}")
    if not interpreted(tl.zeros):
        raise ValueError(
            "Triton kernels on the CPU run through the Triton interpreter, which triton enables "
            "only when TRITON_INTERPRET=1 is in the environment before triton is first imported; "
            "start the process with TRITON_INTERPRET=1 (slow, for tests), or use "
            "kernel_backend='torch' on the CPU")


def check_launchable(kernel, device: torch.device) -> None:
    """:func:`check_device`, and that ``kernel`` itself was decorated as the device needs.

    Raises:
        ValueError: as :func:`check_device`; a compiled kernel for CPU tensors (decorated
            before TRITON_INTERPRET=1 was set).
    """
    check_device(device)
    if device.type == "cpu" and not interpreted(kernel):
        raise ValueError(f"the Triton kernel {kernel.__name__} was compiled, not interpreted: "
                         f"TRITON_INTERPRET=1 was set after it was imported")


def dot_dtype(dtype: torch.dtype, kernel) -> tl.dtype:
    """The dtype ``tl.dot`` operands are cast to: the tensors' own when compiled, float32 when
    interpreted.

    The interpreter of triton 3.9 multiplies bfloat16 ``tl.dot`` operands as their raw 16-bit
    integers (numpy has no bfloat16; triton-lang/triton issue 11584), and numpy's float16
    matmul has no BLAS path; float32 operands hold both exactly.
    """
    if interpreted(kernel):
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def tile(n: int) -> int:
    """The block size for a dimension of ``n`` (tokens, rank rows): 16, the least ``tl.dot``
    takes on GPUs, up to 16, else 64; two sizes keep the compiled variants per kernel few."""
    return 16 if n <= 16 else 64


def pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= ``max(n, least)``: a block size covering ``n`` elements
    (``tl.dot`` needs 16 at least on GPUs)."""
    return triton.next_power_of_2(max(n, least))


def check_tensor(name: str, t: torch.Tensor, *, ndim: int, dtype: torch.dtype,
                 device: torch.device, contiguous: bool = False) -> None:
    """Checks what a kernel assumes of an argument: its rank, dtype, device, and a unit stride
    in the last dimension (all of it contiguous with ``contiguous``).

    Raises:
        ValueError: naming ``name`` and what is wrong with it.
    """
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other tensors on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:  # a size-1 dimension may have any stride
        raise ValueError(f"{name} needs a unit stride in its last dimension, got {t.stride()}")
