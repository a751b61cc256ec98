"""Tensor parallelism on the CPU (gloo, 2 worker processes of 1 thread) against one process
and against HF transformers + PEFT: logits of mixed batches over adapters of ranks 1 to 64 on
all seven projections (rsLoRA, rank and alpha patterns, base requests in between), greedy
tokens under page pressure (preemption, adapter eviction to disk and reload, chunked
prefill, prefix caching), KV heads replicated (one KV head over two ranks) in the static
layout, and Ctrl-C during a step. Each engine starts once per module (a start spawns two
processes that import torch)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from support import (
    TINY,
    OracleSampler,
    PeftOracle,
    drive,
    logits_rtol,
    model_config,
    peft_greedy,
    process_alive,
    random_prompt,
    recording_within,
    rows_apart,
    save_adapters,
    save_random_adapter,
    save_random_dora_adapter,
    save_random_llama,
    shm_of,
    wait_gone,
)

from pagedlora import AdapterMix, Engine, SamplingParams
from pagedlora.adapter_pages import packed_pages
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.parallel.shard import Shard
from pagedlora.row_packing import RowGroup, pack_rows

ALL = list(TARGET_MODULES)  # the seven decoder projections
MIXED = {
    "r1": dict(r=1, target_modules=ALL, seed=1),
    "r64": dict(r=64, target_modules=ALL, seed=2),
    "rs": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL, seed=3),
    "pat": dict(r=4, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                rank_pattern={"layers.0.self_attn.o_proj": 12},
                alpha_pattern={"layers.1.mlp.down_proj": 5}, seed=4),
    "mlp": dict(r=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                layers_to_transform=[1], seed=5),
}
OPTIONS = dict(block_size=8, max_lora_rank=64, max_loras=8, pool_gb=0.02)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory):
    return save_adapters(tiny_llama_dir, tmp_path_factory.mktemp("tp-adapters"), MIXED)


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, dirs):
    return PeftOracle(tiny_llama_dir, dirs).logits


@pytest.fixture(scope="module")
def hf_base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _engine(model_dir, dirs, **options) -> Engine:
    engine = Engine(model_dir, **{**OPTIONS, **options})
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def tp2(tiny_llama_dir, dirs):
    """TP=2 with the test's sampler in the driver (rank 0 sends the logits)."""
    with _engine(tiny_llama_dir, dirs, sampler=OracleSampler(), tensor_parallel_size=2) as e:
        yield e


def _arrivals():
    names = [None, *MIXED]
    first = [(f"{n}-0", random_prompt(3 + 4 * i, seed=i), n) for i, n in enumerate(names)]
    return {0: first,
            2: [("r64-late", random_prompt(5, 40), "r64"), ("base-late", random_prompt(9, 41),
                                                            None)],
            3: [("pat-late", random_prompt(30, 42), "pat"), ("rs-late", random_prompt(2, 43),
                                                           "rs")]}


TP_ATOL = 1e-4  # the bound on fp32 logits, two ranks against one process


def test_logits_equal_peft_and_one_process_for_mixed_batches(tp2, tiny_llama_dir, dirs,
                                                             oracle):
    """Every sampled row of a mixed batch (five adapters on all projections or patterns,
    ranks 1 to 64, rsLoRA, base requests; later arrivals prefilled next to decodes) is
    within the project's float32 tolerance of PEFT's for the same tokens, and within 1e-4
    of one process's (measured: 7e-6)."""
    two, one = {}, {}
    rtol = logits_rtol(model_config(tp2))
    d = drive(tp2, _arrivals(), oracle, max_tokens=5, compare=recording_within(two, rtol))
    assert d.num_compared == 5 * 10 and d.mixed_steps()
    with _engine(tiny_llama_dir, dirs, sampler=OracleSampler()) as single:
        drive(single, _arrivals(), oracle, max_tokens=5, compare=recording_within(one, rtol))
    err = rows_apart(two, one)
    assert err <= TP_ATOL, err
    assert tp2.model is None and tp2.core.runner.kernel_backend == "torch"


def test_ctrl_c_during_a_step_finishes_it_and_keeps_the_engine(tp2):
    """Ctrl-C reaches the whole process group while the driver waits for a step: the workers
    ignore it, the driver finishes the step, then generate raises KeyboardInterrupt (its
    requests aborted) and the engine serves the next call."""
    runner = tp2.core.runner
    pids = runner.pids
    real = runner._answers
    steps = []

    def ctrl_c(*args, **kwargs):  # the terminal's SIGINT, to every process of the group
        steps.append(1)
        if len(steps) == 2:
            for pid in [*pids, os.getpid()]:
                os.kill(pid, signal.SIGINT)
        return real(*args, **kwargs)

    runner._answers = ctrl_c
    # what a terminal's Python has; an earlier test's library may have left another handler
    prior = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupted = False
    try:
        tp2.generate([random_prompt(20, 7)], sampling_params=GREEDY, progress=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        del runner._answers
        signal.signal(signal.SIGINT, prior)
    assert interrupted, (steps, prior)
    assert len(steps) == 2  # raised when the interrupted step was over, not in the next
    assert all(process_alive(p) for p in pids) and runner.error is None
    assert tp2.stats()["requests_running"] == 0 and tp2.outputs.num_live == 0
    out = tp2.generate([random_prompt(6, 8)], adapters="r1", sampling_params=GREEDY,
                       progress=False)
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 10


def test_prefix_cache_hits_give_the_same_tokens(tp2, hf_base, dirs, monkeypatch):
    """A prompt served again from the prefix cache gives the same tokens; each step sends the
    workers the request's new blocks only."""
    from pagedlora.parallel import messages

    sent = []
    real = messages.SequenceUpdate.of.__func__

    def spy(cls, s, known):
        update = real(cls, s, known)
        sent.append((update.first_block, len(update.new_blocks), len(s.block_table)))
        return update
    monkeypatch.setattr(messages.SequenceUpdate, "of", classmethod(spy))
    prompt = random_prompt(29, 9)
    first = tp2.generate([prompt], adapters="rs", sampling_params=GREEDY, progress=False)
    # 29 + 10 tokens: the prompt's 4 blocks of 8 once, then the 5th when it starts
    assert sent[0] == (0, 4, 4) and all(f == t - n for f, n, t in sent[1:])
    assert sum(n for _, n, _ in sent) == 5
    hits = tp2.stats()["prefix_cache"]["hit_tokens"]
    again = tp2.generate([prompt], adapters="rs", sampling_params=GREEDY, progress=False)
    assert tp2.stats()["prefix_cache"]["hit_tokens"] - hits == 24  # 3 full blocks of 8
    assert again[0].token_ids == first[0].token_ids == peft_greedy(hf_base, dirs["rs"],
                                                                   prompt, 10)


def test_triton_kernels_under_the_interpreter_give_the_torch_kernels_tokens(
        tiny_llama_dir, dirs, tmp_path, monkeypatch):
    """kernel_backend="triton" in the workers (the interpreter: TRITON_INTERPRET=1 in their
    environment): the row-parallel modules' shrink, all-reduce and expand run on the Triton
    kernels, a mix's overlapping segments in groups, a DoRA adapter's scale after the
    all-reduce; the tokens are the torch kernels' in one process."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    few = {n: dirs[n] for n in ("r1", "pat", "rs")}
    few["dora"] = save_random_dora_adapter(tiny_llama_dir, tmp_path / "dora", r=4, seed=23,
                                           target_modules=["q_proj", "o_proj", "down_proj"])
    names = ["pat", None, "rs", "r1", AdapterMix({"pat": 0.6, "rs": -0.8}), "dora"]
    prompts = [random_prompt(4 + 3 * i, seed=80 + i) for i in range(len(names))]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with _engine(tiny_llama_dir, few, tensor_parallel_size=2, kernel_backend="triton") as tp:
        assert tp.core.runner.kernel_backend == "triton"
        got = [o.token_ids for o in tp.generate(prompts, adapters=names, sampling_params=sp,
                                                progress=False)]
    with _engine(tiny_llama_dir, few) as single:
        want = [o.token_ids for o in single.generate(prompts, adapters=names,
                                                     sampling_params=sp, progress=False)]
    assert got == want


# -- page pressure: preemption, eviction and reload, chunked prefill, prefix caching ----------

PRESSURE = {"p2": dict(r=2, target_modules=["q_proj", "v_proj"], seed=11),
            "p8": dict(r=8, target_modules=ALL, seed=12),
            "p16": dict(r=16, target_modules=["gate_proj", "up_proj", "down_proj"], seed=13),
            "p4": dict(r=4, target_modules=["o_proj", "k_proj"], seed=14)}


def _pressure_pool_gb() -> float:
    """Room for the largest adapter and 24 KV pages on each rank (pages of 2 x 8 tokens x
    1 KV head x 16 x fp32): the batch below needs ~100 KV pages at its peak, and the two
    largest adapters do not fit together. (Room for both, as before adapters' last pages were
    shared, left the run at 0-1 preemptions: too close to the edge.)"""
    shard = Shard.of(SimpleNamespace(head_dim=None, **TINY), 0, 2)
    page_numel = 2 * 8 * shard.num_kv_heads * shard.head_dim
    sizes = sorted(pack_rows([RowGroup((layer, m, half), shard.lora_widths[m][i], o["r"])
                              for layer in range(2) for m in o["target_modules"]
                              for i, half in enumerate("ab")], page_numel).num_pages
                   for o in PRESSURE.values())  # as AdapterPacker packs them
    return (sizes[-1] + 24.5) * page_numel * 4 / 2**30


def test_greedy_tokens_under_page_pressure_equal_peft_and_one_process(tiny_llama_dir,
                                                                      tmp_path_factory,
                                                                      hf_base):
    """Rank 0 samples (the default sampler). Requests outgrow the pool (preemption), the
    adapters do not all fit (eviction, reload), host memory keeps one (spill to disk and
    back), prompts are longer than a step's budget (chunked prefill): the tokens are
    HF+PEFT's and one process's; after close() no worker and no shared memory is left."""
    root = tmp_path_factory.mktemp("tp-pressure")
    dirs = save_adapters(tiny_llama_dir, root, PRESSURE)
    names = ["p2", None, "p8", "p16", "p4", "p8", None, "p16"]
    prompts = [random_prompt(14 + 3 * i, seed=60 + i) for i in range(len(names))]
    options = dict(max_num_batched_tokens=16, max_loras=2, max_cpu_loras=1, max_lora_rank=16,
                   pool_gb=_pressure_pool_gb())
    with _engine(tiny_llama_dir, dirs, tensor_parallel_size=2, **options) as engine:
        outs = engine.generate(prompts, adapters=names, sampling_params=GREEDY, progress=False)
        stats = engine.stats(history=True)
        pids = engine.core.runner.pids
        shared = [w.a.is_shared() for k in engine.adapters.host_keys
                  for w in engine.adapters._host.get(k).values()]
    assert wait_gone(pids) == [] and shm_of(pids) == []
    got = [o.token_ids for o in outs]
    want = [peft_greedy(hf_base, dirs.get(n), p, 10) for n, p in zip(names, prompts,
                                                                      strict=True)]
    assert got == want
    # one process with the two ranks' memory (a rank's pages hold half the KV heads and
    # half of each split row)
    with _engine(tiny_llama_dir, dirs, **{**options, "pool_gb": 2 * options["pool_gb"]}) as single:
        assert [o.token_ids for o in single.generate(prompts, adapters=names,
                                                      sampling_params=GREEDY,
                                                      progress=False)] == got
    adapters = stats["adapters"].values()
    assert stats["preemptions"] > 0
    assert sum(a["evictions"] for a in adapters) > 0
    assert sum(a["loads_from_disk"] for a in adapters) > 0
    assert sum(a["loads_from_host"] for a in adapters) > len(PRESSURE)  # reloads
    assert any(s["num_tokens"] == 16 for s in stats["steps"])  # a full chunked step
    assert shared and all(shared)  # the host tier's copies are in shared memory


# -- KV heads replicated, static layout ----------------------------------------------------------


def test_one_kv_head_over_two_ranks_in_the_static_layout(tmp_path_factory, default_model_dir):
    """Multi-query attention (1 KV head) over 2 ranks: each rank holds that head (and its
    LoRA columns of k/v), its query heads' half; tokens equal HF+PEFT's, with
    memory_layout="static" (every adapter in a max-rank slot)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tp-mqa")
    model = save_random_llama(root / "mqa", default_model_dir, seed=3, num_key_value_heads=1)
    dirs = {"kv": save_random_adapter(model, root / "kv", r=4, target_modules=ALL, seed=21),
            "kvo": save_random_adapter(model, root / "kvo", r=8,
                                       target_modules=["k_proj", "v_proj", "o_proj"], seed=22)}
    names = ["kv", None, "kvo", "kv"]
    prompts = [random_prompt(5 + 4 * i, seed=70 + i) for i in range(len(names))]
    with _engine(model, dirs, tensor_parallel_size=2, memory_layout="static", max_loras=2,
                 max_lora_rank=8) as engine:
        outs = engine.generate(prompts, adapters=names, sampling_params=GREEDY, progress=False)
        stats = engine.stats()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    assert [o.token_ids for o in outs] == [peft_greedy(hf, dirs.get(n), p, 10)
                                           for n, p in zip(names, prompts, strict=True)]
    # a page is 2 x 8 tokens x 1 KV head x 16 x 4 bytes on each rank, as with one process;
    # each adapter holds a slot of rank 8 on every projection at a rank's widths
    shard = Shard.of(SimpleNamespace(**{**TINY, "head_dim": None, "num_key_value_heads": 1}),
                     0, 2)
    slot = packed_pages({(layer, m): 8 for layer in range(2) for m in ALL}, shard.lora_widths,
                        256)
    assert stats["page_bytes"] == 1024 and stats["pages_adapter"] == 2 * slot
