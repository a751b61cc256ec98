"""The Triton kernels against their torch references, and the engine on them.

The cases live in ``triton_cases.py``; ``triton_compile_check.py`` compiles the kernels for a
GPU. On the CPU they run through the Triton interpreter,
which triton (3.9) enables only when ``TRITON_INTERPRET=1`` is set before it is first imported
(other test files import it through transformers and peft), so they run here in a fresh Python
process with that environment; with CUDA the same process runs them compiled. Nothing leaks into
this process's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedlora import EngineConfig

TESTS = Path(__file__).parent


def run_python(args: list[str], *, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=900)


def test_triton_cases_pass_compiled_on_cuda_or_interpreted_on_the_cpu():
    r = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                    str(TESTS / "triton_cases.py")], interpret=not torch.cuda.is_available())
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_kernels_compile_for_a_hopper_gpu_without_one():
    r = run_python([str(TESTS / "triton_compile_check.py")], interpret=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("compiled ") == 14, r.stdout


def test_cpu_backends_without_the_interpreter():
    # A process that never set TRITON_INTERPRET: "auto" is torch and imports no triton;
    # "triton" is refused with the remedy, at model construction rather than mid-step.
    code = """if True:
        import sys, torch
        from pagedlora.kernels.backend import select_kernels
        cpu = torch.device("cpu")
        assert select_kernels("auto", cpu).backend == "torch"
        assert "triton" not in sys.modules
        try:
            select_kernels("triton", cpu)
        except ValueError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("kernel_backend='triton' on the CPU was accepted")
    """
    r = run_python(["-c", code], interpret=False)
    assert r.returncode == 0, r.stderr[-4000:]


def test_kernel_backend_is_validated():
    assert EngineConfig().kernel_backend == "auto"
    with pytest.raises(ValueError, match="kernel_backend must be one of .* got 'cuda'"):
        EngineConfig(kernel_backend="cuda")
