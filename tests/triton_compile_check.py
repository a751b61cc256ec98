"""Compiles every Triton kernel ahead of time for a Hopper GPU (sm_90) through ptxas, no GPU needed.

The interpreter that runs the kernel tests on the CPU is lenient where the compiler is not
(``tl.dot`` block sizes and dtypes, early returns, integer widths); this catches those errors
on a machine without a GPU. Run by ``test_triton_kernels.py`` in a process without
``TRITON_INTERPRET`` (the kernels must be ``JITFunction``s); prints one line per variant.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedlora.kernels import triton_attention, triton_lora

HOPPER = GPUTarget("cuda", 90, 32)
INDEX = "*i64"


def compile_kernel(kernel, types: dict[str, str], constexprs: dict) -> None:
    """Compiles ``kernel`` to a cubin; ``types`` gives each runtime argument's type ("i32",
    "*bf16"...), ``constexprs`` the value of the others (an int argument equal to 1 is
    specialized by triton, so it may appear here too)."""
    signature = {name: "constexpr" if name in constexprs else types[name]
                 for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER)
    print(f"compiled {kernel.__name__} {constexprs}")


def main() -> None:
    ints = lambda *names: dict.fromkeys(names, "i32")  # noqa: E731
    for name, dot in (("bf16", tl.bfloat16), ("fp16", tl.float16)):
        p = f"*{name}"
        compile_kernel(triton_attention._write_kv_kernel, dict(
            k_ptr=p, v_ptr=p, kv_ptr=p, pages_ptr=INDEX, offsets_ptr=INDEX,
            **ints("stride_kt", "stride_vt", "stride_page", "stride_kv", "stride_slot",
                   "width")), dict(BLOCK=1024))
        attention = dict(
            q_ptr=p, kv_ptr=p, tables_ptr=INDEX, q_start_ptr=INDEX, q_lens_ptr=INDEX,
            ctx_lens_ptr=INDEX, out_start_ptr=INDEX, lse_ptr="*fp32", scale="fp32",
            **ints("group", "block_size", "head_dim", "kv_splits", "split_len", "split_rows",
                   "stride_qt", "stride_qh", "stride_page", "stride_kv", "stride_slot",
                   "stride_kvh", "stride_table", "stride_ot", "stride_oh", "stride_lt"))
        # MHA decode split in key ranges (fp32 partial outputs); GQA prefill
        # kv_splits is not specialised on: a decode (split) and a prefill variant
        for block_m, out, one in ((16, "*fp32", {"group": 1}), (64, p, {})):
            compile_kernel(triton_attention._paged_attention_kernel, {**attention, "out_ptr": out},
                           dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=128, DOT=dot, **one))
        shrink = dict(x_ptr=p, a_ptr=p, pages_ptr=INDEX, slots_ptr=INDEX, seg_ptr=INDEX,
                      scale_ptr="*fp32", tmp_ptr="*fp32",
                      **ints("in_features", "piece_width", "split_k", "stride_xt",
                             "stride_page", "stride_slot", "stride_tmp"))
        # split_k and the strides that vary per step are not specialised on (one variant);
        # rows whole, and in narrow pieces (SmolLM2's 576-wide rows: 3 x 192)
        for pieces in (1, 3):
            compile_kernel(triton_lora._shrink_kernel, shrink, dict(
                BLOCK_M=16, BLOCK_R=64, BLOCK_K=128, PIECES=pieces, DOT=dot))
            compile_kernel(triton_lora._expand_kernel, dict(
                tmp_ptr="*fp32", b_ptr=p, pages_ptr=INDEX, slots_ptr=INDEX, seg_ptr=INDEX,
                y_ptr=p, **ints("out_features", "piece_width", "stride_tmp", "stride_page",
                                "stride_slot", "stride_yt")),
                dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=64, PIECES=pieces, DOT=dot))


if __name__ == "__main__":
    main()
