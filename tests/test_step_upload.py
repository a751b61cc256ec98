"""The step's index tensors in one host-to-device transfer, and no device synchronisation in a
step's forward pass.

A CUDA device is not available here: the staged path (pack into one host buffer, one copy into
one device buffer, views of it) runs on the CPU with ``StepUpload(..., staged=True)``, which is
the same code without pinning. Greedy tokens of an engine uploading that way are checked
against PEFT; a device synchronisation (reading a value back, indexing with a boolean mask) is
an aten op (``_local_scalar_dense``, ``nonzero``) that a dispatch mode sees on the CPU as well
(benchmarks/step_census.py counts them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from support import PeftOracle, random_prompt, save_adapters

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.step_upload import StepUpload, to_device

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from step_census import census  # noqa: E402

ADAPTERS = {
    "a": dict(r=4, target_modules=["q_proj", "v_proj"], seed=31),
    "b": dict(r=16, target_modules=list(TARGET_MODULES), seed=32),
    "c": dict(r=8, target_modules=["k_proj", "o_proj", "down_proj"], seed=33),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return save_adapters(tiny_llama_dir, tmp_path_factory.mktemp("upload"), ADAPTERS)


def test_upload_packs_every_tensor_into_one_buffer():
    up = StepUpload(torch.device("cpu"), staged=True)
    host = [torch.arange(5), torch.arange(12).view(3, 4) * 7, torch.tensor([], dtype=torch.long),
            torch.arange(6).view(2, 3).t()]  # a non-contiguous one
    out = up(host)
    assert [o.shape for o in out] == [h.shape for h in host]
    assert all(torch.equal(o, h) for o, h in zip(out, host, strict=True))
    base = out[0].untyped_storage().data_ptr()
    assert all(o.untyped_storage().data_ptr() == base for o in out)  # one device buffer
    assert up.transfers == 1 and up.capacity >= 23
    capacity = up.capacity
    small = up([torch.tensor([9, 8, 7])])
    assert small[0].tolist() == [9, 8, 7] and up.capacity == capacity  # reused, not regrown
    assert small[0].untyped_storage().data_ptr() == base
    big = up([torch.arange(3 * capacity)])
    assert up.capacity >= 3 * capacity and torch.equal(big[0], torch.arange(3 * capacity))
    assert up.transfers == 3


def test_upload_names_a_tensor_it_cannot_take():
    up = StepUpload(torch.device("cpu"), staged=True)
    with pytest.raises(ValueError, match="tensor 1 is torch.float32"):
        up([torch.arange(3), torch.zeros(2)])
    assert up.transfers == 0
    assert StepUpload(torch.device("cpu")).staged is False  # the CPU copies nothing


def _requests(n: int):
    names = [None, "a", "b", "c", "b", "a", None, "c"][:n]
    return [random_prompt(4 + 5 * i, seed=60 + i) for i in range(n)], names


def test_a_staged_engine_matches_peft(tiny_llama_dir, adapter_dirs):
    """Steps of chunked prefills beside decodes (two attention groups) over three adapters and
    the base model, every index tensor of every step through one staged buffer: PEFT's greedy
    tokens."""
    oracle = PeftOracle(tiny_llama_dir, adapter_dirs)
    with Engine(tiny_llama_dir, pool_gb=0.05, max_num_seqs=8, max_loras=3, max_lora_rank=16,
                max_num_batched_tokens=24, kernel_backend="torch") as engine:
        runner = engine.core.runner
        runner.upload = StepUpload(torch.device("cpu"), staged=True)
        for name, path in adapter_dirs.items():
            engine.add_adapter(name, path)
        prompts, names = _requests(8)
        outs = engine.generate(prompts, names, SamplingParams(max_tokens=6, temperature=0.0,
                                                              ignore_eos=True), progress=False)
        history = engine.stats(history=True)["steps"]
        assert runner.upload.transfers == len(history)
        lengths = [{n == 1 for _, _, n in s["scheduled"]} for s in history]
        assert {True, False} in lengths  # a step with decodes and a prefill chunk
    for out, prompt, name in zip(outs, prompts, names, strict=True):
        assert out.token_ids == oracle.greedy(name, prompt, 6), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_device_synchronisation_in_a_step(tiny_llama_dir, adapter_dirs, dtype):
    """The runner's part of a prefill step and of a decode step (with adapters: building the
    batch, the forward pass, sampling; adapter loads, which read files, come before it)
    dispatches no op that reads a device value back to the host (``step_census``'s reads:
    ``item``, ``nonzero``...): on a GPU each would stall the host until the device caught up
    (the sampled tokens' one read-back is ``tolist``, outside the dispatcher)."""
    with Engine(tiny_llama_dir, pool_gb=0.05, max_num_seqs=8, max_loras=3, max_lora_rank=16,
                dtype=dtype, kernel_backend="torch") as engine:
        for name, path in adapter_dirs.items():
            engine.add_adapter(name, path)
        prompts, names = _requests(6)
        for p, n in zip(prompts, names, strict=True):
            engine.add_request(p, n, SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True))
        for kind in ("prefill", "decode"):
            counted = census(engine)
            assert (counted.num_tokens > counted.batch_size) == (kind == "prefill")
            assert counted.torch_ops > 50, counted
            assert counted.device_to_host == 0, (kind, counted)


def test_to_device_on_the_cpu_is_the_tensor_itself():
    host = torch.arange(4)
    assert to_device(host, torch.device("cpu")) is host  # no copy where host is device
