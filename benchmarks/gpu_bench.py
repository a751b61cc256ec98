"""pagedlora on S-LoRA's synthetic workloads, on one GPU: a Llama-2-7B-shaped model of random
fp16 weights, settings S1 and S2, n adapters, offline throughput and online SLO attainment.

Settings (S-LoRA, Sheng et al. 2023, section 7.1 and Table 3; S-LoRA's benchmarks/exp_suite.py):
S1 is Llama-7B with rank-8 adapters, S2 the same base with ranks 64, 32, 16 and 8 (adapter i
takes ``ranks[i % 4]``, as S-LoRA's launcher cycles them); every adapter targets q, k, v and o
projections. n is 5, 100 and 1000 adapters (S-LoRA's Table 4 columns); popularity is uniform
(alpha = 1) and arrivals are Poisson (cv = 1), as in S-LoRA's "a100-80-table" suite.

Runs, per (setting, n), on the same requests:
    offline   every request at t=0; output tokens/s and finished requests/s until all finish
              or the run's cap (``offline_cap_s``).
    online    requests added (``Engine.add_request``) as their trace arrival times pass, the
              engine stepped in between; SLO attainment is the fraction of the trace's requests
              whose first token came within 6 s of their arrival (S-LoRA section 7.1), TTFT
              and TPOT p50/p90. The run lasts until all finish or ``online_drain_s`` after the
              last arrival (>= 6 s, so every request's SLO verdict is known; a request never
              served counts as a miss).
TTFT is measured from the trace arrival time (t=0 offline) to the end of the step that made the
request's first token, so the wait for a running step counts; TPOT is (last - first token time)
/ (tokens - 1).

Lengths: prompts of 8-512 tokens (S-LoRA's range), outputs of 8-128 tokens (S-LoRA uses 8-512;
shortened so that twelve runs fit the 8-minute budget), generated greedily with ignore_eos.

Adapters: 1000 adapters of 7B shape cannot all be distinct files on the lent machine's disk (a
rank-64 q,k,v,o adapter is 134 MB in fp16). ``distinct_weights`` weight files are written per
rank; adapter i is a directory of its own whose ``adapter_model.safetensors`` is a hard link (a
symlink where links fail) to one of them and whose ``adapter_config.json`` has its own
``lora_alpha = 2r + (i+1)/1024``. Its scale lora_alpha/r is part of the engine's content hash
(pagedlora/lora_adapter.py ``content_key``), so every adapter is a distinct content key with its
own pages in the pool and its own host copy; the driver checks that the keys are distinct.
S-LoRA itself serves copies of one dummy adapter per rank (``--dummy``). Of the n adapters on
disk, the engine registers those the trace requests (all of them for n = 5 and 100; about 150
of 1000 at 160 requests): an adapter no request uses would cost registration time only, never
pool pages or host memory. Adapters are registered with ``preload=True`` (weights kept in host
memory, as S-LoRA keeps every adapter in main memory) and removed after their (setting, n).

Everything runs in one process and one Engine: model write (cached in ``--work-dir``), adapter
write, engine load, warm-up (compiles the Triton kernels for prefill and decode, short and long
segments, ranks up to 16 and above), then the runs. Elapsed time is printed per phase; a run
that would not fit the remaining ``budget_s`` is skipped and marked so. Results go to
``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md``, both rewritten after every run. Before anything
is timed, one prefill and one decode step of the Triton kernels are compared with the torch
references on a tokenizer-free tiny Llama (:func:`check_backends`); the invocation stops if
they disagree.

    OUT=/tmp/out benchmarks/gpu_bench.sh            # on the GPU machine, about 6 minutes
    OUT=/tmp/out benchmarks/gpu_bench.sh --tensor-parallel-size 2   # over two GPUs
    python benchmarks/gpu_bench.py --dry-run --out /tmp/out   # tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from step_census import census
from workload import TraceRequest, WorkloadSpec, make_trace, percentile, write_adapter

SETTINGS = {"S1": (8,), "S2": (64, 32, 16, 8)}  # ranks; S-LoRA Table 3, exp_suite.LORA_DIR
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SLO_TTFT_S = 6.0  # S-LoRA section 7.1: "SLO attainment: first token within 6 seconds"
MODES = ("offline", "online")

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 initializer_range=0.02, bos_token_id=1, eos_token_id=2)
TINY_LLAMA = {**LLAMA2_7B, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 176,
              "vocab_size": 512, "max_position_embeddings": 1024}


@dataclass(frozen=True)
class Plan:
    """What one invocation runs, and with which engine settings.

    Attributes:
        name: "h200" or "dry-run" (names the cached model folder too).
        model: LlamaConfig fields of the random base model.
        dtype, device: of the model, the pool and the adapter files.
        num_adapters: the n of each setting.
        num_requests: requests per run (the same requests offline and online).
        rate: online arrival rate, requests/s (Poisson). input_range, output_range: inclusive,
            tokens.
        offline_cap_s: seconds an offline run may last. online_drain_s: seconds an online run
            may last after its last arrival (>= SLO_TTFT_S).
        pool_gb: the unified pool, GiB. max_num_seqs, max_num_batched_tokens: batch limits;
            max_loras is max_num_seqs (any batch may hold one adapter per sequence).
        distinct_weights: weight files written per rank (see the module docstring).
        budget_s: seconds the whole invocation may take; later runs are skipped past it.
        threads: torch CPU threads (None: torch's default).
        tensor_parallel_size: devices the model is split over (``Engine``'s option: one
            worker process per GPU, ``cuda:0`` to ``cuda:N-1``; ``pool_gb`` per device).
    """

    name: str
    model: dict
    dtype: str
    device: str
    num_adapters: tuple[int, ...]
    num_requests: int
    rate: float
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    offline_cap_s: float
    online_drain_s: float
    pool_gb: float
    max_num_seqs: int
    max_num_batched_tokens: int
    distinct_weights: int
    budget_s: float
    threads: int | None = None
    tensor_parallel_size: int = 1


# Time budget on an H200 (8 minutes; the shell script's timeout is 470 s), estimated: checks and
# imports ~10 s, model write 13.5 GB ~30 s (skipped when cached), adapter files ~10 s, engine
# load ~20 s, warm-up (Triton compiles) ~50 s; then 6 (setting, n) x (two registrations of up to
# ~150 adapters, <= 5 s each; offline <= 15 s; online ~10 s of arrivals + <= 8 s) ~ 270 s; ~390 s
# in all. budget_s (440) skips runs that would end past it and leaves 30 s to the timeout.
H200 = Plan(name="h200", model=LLAMA2_7B, dtype="float16", device="cuda",
            num_adapters=(5, 100, 1000), num_requests=160, rate=16.0, input_range=(8, 512),
            output_range=(8, 128), offline_cap_s=15.0, online_drain_s=8.0, pool_gb=60.0,
            max_num_seqs=128, max_num_batched_tokens=4096, distinct_weights=4, budget_s=440.0)
DRY_RUN = Plan(name="dry-run", model=TINY_LLAMA, dtype="float32", device="cpu",
               num_adapters=(5, 100, 1000), num_requests=8, rate=50.0, input_range=(4, 40),
               output_range=(2, 8), offline_cap_s=10.0, online_drain_s=8.0, pool_gb=0.05,
               max_num_seqs=8, max_num_batched_tokens=256, distinct_weights=2, budget_s=80.0,
               threads=1)


class Phases:
    """Wall-clock seconds per phase since the start, printed as each phase ends."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 2)
        self.mark = now
        print(f"[{self.elapsed():6.1f} s] {name}: {self.seconds[name]:.1f} s", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def environment(plan: Plan) -> dict:
    """Versions and the device, printed and recorded.

    Raises:
        SystemExit: the plan needs CUDA and torch sees none, or too little free device memory
            for the pool and the model.
    """
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    import pagedlora

    env = {"pagedlora": str(Path(pagedlora.__file__).parent),
           "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": version("triton"),
           "transformers": version("transformers"), "cpus": os.cpu_count(),
           "device": "cpu"}
    if plan.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_bench: torch {torch.__version__} (CUDA {torch.version.cuda}) "
                             f"sees no CUDA device; on a CPU use --dry-run")
        tp = plan.tensor_parallel_size
        if torch.cuda.device_count() < tp:
            raise SystemExit(f"gpu_bench: --tensor-parallel-size {tp} needs {tp} CUDA devices; "
                             f"torch sees {torch.cuda.device_count()}")
        props = torch.cuda.get_device_properties(plan.device)
        env["device"] = f"{tp} x {props.name}, {props.total_memory / 2**30:.0f} GiB"
        need = plan.pool_gb + 16 / tp  # + each rank's part of the 7B model's 12.6 GiB
        for index in range(tp):
            free = torch.cuda.mem_get_info(index)[0] / 2**30
            if free < need:
                raise SystemExit(f"gpu_bench: {free:.0f} GiB free on cuda:{index}; the pool "
                                 f"({plan.pool_gb} GiB) and its shard of the model need "
                                 f"{need:.0f}: pass a smaller --pool-gb")
    env["tensor_parallel_size"] = plan.tensor_parallel_size
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    return env


def llama_config(fields: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**fields)


def write_random_model(out: Path, config, *, dtype: torch.dtype, device: str, seed: int = 0,
                       shard_bytes: int = 2 << 30) -> Path:
    """Writes ``config.json`` and random safetensors shards of a LlamaForCausalLM to ``out``
    (no tokenizer: prompts are token ids), unless ``out`` already holds a finished one.

    Matrices are normal with std ``config.initializer_range``, drawn on ``device`` (fast on a
    GPU) and moved to the host one tensor at a time; norms are ones. Written to ``out.tmp`` and
    renamed, so an interrupted write is never taken for a model. Disk: the model's bytes
    (13.5 GB for Llama-2-7B in fp16), in shards of about ``shard_bytes``.

    Raises:
        SystemExit: less free disk than the model needs (with 10% spare).
    """
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # names and shapes only, nothing allocated
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    size = sum(s.numel() for s in shapes.values()) * dtype.itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < 1.1 * size:
        raise SystemExit(f"gpu_bench: {out.parent} has {free / 1e9:.1f} GB free; the model "
                         f"needs {size / 1e9:.1f} GB")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    g = torch.Generator(device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_size, num_shards = 0, 0
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            shard[name] = torch.ones(shape, dtype=dtype)
        else:
            shard[name] = (torch.randn(shape, generator=g, device=device, dtype=dtype)
                           .mul_(config.initializer_range).cpu())
        shard_size += shard[name].nbytes
        if shard_size >= shard_bytes or i == len(shapes) - 1:
            save_file(shard, tmp / f"model-{num_shards:05d}.safetensors")
            shard, shard_size, num_shards = {}, 0, num_shards + 1
    config.save_pretrained(tmp)
    tmp.rename(out)
    return out


def write_setting_adapters(root: Path, config, *, ranks: tuple[int, ...], num: int,
                           distinct: int, dtype: torch.dtype) -> list[Path]:
    """``num`` distinct PEFT adapters ``root/a0000``... of ``config``'s model on q,k,v,o, from
    ``distinct`` weight files per rank (see the module docstring). Adapter i has rank
    ``ranks[i % len(ranks)]``, the weights ``root/weights/r<rank>-<k>`` with
    ``k = (i // len(ranks)) % distinct`` (hard-linked), and ``lora_alpha = 2r + (i+1)/1024``.
    Folders already complete (their config is written last) are kept.

    Returns:
        the adapter folders, index i for adapter i.
    """
    weights = {}
    for rank in ranks:
        for k in range(distinct):
            path = root / "weights" / f"r{rank}-{k}"
            if not (path / "adapter_config.json").is_file():
                write_adapter(path, config, rank=rank, target_modules=TARGETS, dtype=dtype,
                              generator=torch.Generator().manual_seed(1000 * rank + k))
            weights[rank, k] = path
    paths = []
    for i in range(num):
        rank = ranks[i % len(ranks)]
        source = weights[rank, (i // len(ranks)) % distinct]
        path = root / f"a{i:04d}"
        if not (path / "adapter_config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            link = path / "adapter_model.safetensors"
            link.unlink(missing_ok=True)
            try:
                os.link(source / link.name, link)
            except OSError:  # a file system without hard links
                link.symlink_to((source / link.name).resolve())
            cfg = json.loads((source / "adapter_config.json").read_text())
            # its own scale, so its own content hash (also unlike the weights' own folder)
            cfg["lora_alpha"] = 2 * rank + (i + 1) / 1024
            (path / "adapter_config.json").write_text(json.dumps(cfg))
        paths.append(path)
    return paths


def make_engine(plan: Plan, model_dir: Path):
    from pagedlora import Engine

    return Engine(model_dir, pool_gb=plan.pool_gb, dtype=plan.dtype, device=plan.device,
                  max_num_seqs=plan.max_num_seqs,
                  max_num_batched_tokens=plan.max_num_batched_tokens,
                  max_loras=plan.max_num_seqs, max_lora_rank=max(SETTINGS["S2"]),
                  enable_prefix_caching=False,
                  tensor_parallel_size=plan.tensor_parallel_size)


def warm_up(engine, plan: Plan, paths: dict[str, list[Path]], num_adapters: int = 64) -> None:
    """Runs batches of 5 to ``max_num_seqs`` requests, prompts of 1 token to the longest, over
    the first ``num_adapters`` adapters of each setting and the base model, so that the Triton
    kernels compile here rather than in a timed run: prefill and decode tiles, ranks up to 16
    and above (S1 has rank 8 only, S2 mixed ranks), few and many segments per step (split and
    unsplit LoRA reductions). The adapters are removed afterwards."""
    from pagedlora import SamplingParams

    lo, hi = plan.input_range
    lengths = [1, lo, (lo + hi) // 2, hi]
    counts = sorted({min(c, plan.max_num_seqs) for c in (5, 16, 37, plan.max_num_seqs)})
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for setting, setting_paths in paths.items():
        names = register(engine, f"warm-{setting}", setting_paths,
                         list(range(min(num_adapters, len(setting_paths)))))
        choices = [None, *names.values()]
        for count in counts:
            prompts = [[3 + i % 100] * lengths[i % len(lengths)] for i in range(count)]
            outs = engine.generate(prompts, [choices[i % len(choices)] for i in range(count)],
                                   sp, progress=False)
            errors = [o.error for o in outs if o.finish_reason == "error"]
            if errors:
                raise RuntimeError(f"warm-up: {len(errors)} requests failed: {errors[0]}")
        for name in names.values():
            engine.remove_adapter(name)


# Largest |log-probability| difference (nats) of a generated token between the Triton and the
# torch kernels on the check's tiny model: float32 on a GPU runs Triton's dots in TF32
# (10-bit mantissa) against cuBLAS's float32; half precision rounds every projection.
BACKEND_ATOL = {"float32": 5e-3, "float16": 5e-2, "bfloat16": 1e-1}


def check_backends(plan: Plan, work: Path, num_requests: int = 8) -> dict:
    """The Triton kernels against the torch references on ``plan.device`` before anything is
    timed: a tokenizer-free tiny Llama (``TINY_LLAMA``, random ``plan.dtype`` weights) with S2's
    four ranks on q, k, v, o, ``num_requests`` requests of 1-40 tokens (adapters and the base
    model mixed) through one engine per backend, greedy, two tokens each: one prefill step and
    one decode step. The chosen tokens' log-probabilities must be within
    ``BACKEND_ATOL[plan.dtype]`` (a request's later positions are compared while its tokens
    agree: a near tie may pick another token, which is counted, not failed). Triton on the
    CPU needs ``TRITON_INTERPRET=1`` (the dry run of gpu_bench.sh sets it); without it the
    check is skipped and says so.

    Returns:
        ``{"tokens_equal": "k/n" (requests whose tokens all agree), "max_logprob_diff": nats,
        "atol": nats, "backends": the kernels each engine ran}``, or ``{"skipped": why}``.
    Raises:
        SystemExit: the backends disagree (timing wrong kernels would mean nothing).
    """
    from pagedlora import Engine, SamplingParams

    if plan.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "Triton on the CPU needs TRITON_INTERPRET=1"}
    # weights of std 0.2, as the tests' tiny Llamas: peaked logits, so few near ties
    config = llama_config({**TINY_LLAMA, "initializer_range": 0.2})
    dtype = getattr(torch, plan.dtype)
    model_dir = write_random_model(work / f"check-{plan.dtype}-model", config, dtype=dtype,
                                   device=plan.device)
    paths = write_setting_adapters(work / f"check-{plan.dtype}-adapters", config,
                                   ranks=SETTINGS["S2"], num=len(SETTINGS["S2"]), distinct=1,
                                   dtype=dtype)
    prompts = [[3 + (7 * i + j) % 500 for j in range(1 + (13 * i) % 40)]
               for i in range(num_requests)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=1)
    outs, ran = {}, []
    for backend in ("triton", "torch"):
        engine = Engine(model_dir, pool_gb=0.05, dtype=plan.dtype, device=plan.device,
                        kernel_backend=backend, max_loras=len(paths),
                        max_lora_rank=max(SETTINGS["S2"]), enable_prefix_caching=False)
        for i, path in enumerate(paths):
            engine.add_adapter(f"c{i}", path)
        names = [None, *(f"c{i}" for i in range(len(paths)))]
        ran.append(engine.core.runner.kernel_backend)
        chosen = [names[i % len(names)] for i in range(num_requests)]
        if backend == "triton":
            counted = step_counts(engine, prompts, chosen)
        outs[backend] = engine.generate(prompts, chosen, params, progress=False)
        engine.close()
    equal, worst = 0, 0.0
    for a, b in zip(outs["triton"], outs["torch"], strict=True):
        for x, y, ta, tb in zip(a.logprobs, b.logprobs, a.token_ids, b.token_ids, strict=True):
            worst = max(worst, abs(x.logprob - y.logprob))  # the chosen token's, a near tie too
            if ta != tb:
                break  # the next positions see other tokens
        else:
            equal += 1
    result = {"tokens_equal": f"{equal}/{num_requests}", "max_logprob_diff": worst,
              "atol": BACKEND_ATOL[plan.dtype], "backends": ran, "triton_census": counted}
    print(f"backend check (Triton vs torch, tiny Llama, {plan.dtype}): {result}", flush=True)
    if worst > BACKEND_ATOL[plan.dtype]:
        raise SystemExit(f"gpu_bench: the Triton kernels disagree with the torch ones on the "
                         f"tiny model ({result}); nothing timed")
    return result


def step_counts(engine, prompts: list[list[int]], names: list) -> dict[str, dict]:
    """What the first step of ``prompts`` (adapters ``names``) and their first step of decodes
    only ask of the device (:func:`step_census.census`: kernel launches, torch ops,
    host-to-device copies and how many block, reads back). Prompts that need several steps
    (chunked prefill) are stepped through, counted, until every sequence decodes; then the
    requests are aborted.

    Returns:
        ``{"prefill": counts, "decode": counts}``.
    Raises:
        RuntimeError: the engine does not run the model in this process (tensor parallelism:
            the workers do), so there is nothing to count here.
    """
    from pagedlora import SamplingParams

    if engine.config.tensor_parallel_size > 1:
        raise RuntimeError("step_counts counts this process's model runner; under tensor "
                           "parallelism the workers run the model")
    sp = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, n, sp) for p, n in zip(prompts, names, strict=True)]
    counts = {"prefill": census(engine).as_dict()}
    for _ in range(1024):
        step = census(engine)
        if step.num_tokens == step.batch_size == len(prompts):
            counts["decode"] = step.as_dict()
            break
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    if "decode" not in counts:
        raise RuntimeError(f"no step decoded all {len(prompts)} requests at once")
    return counts


def batch_census(engine, plan: Plan, paths: list[Path]) -> dict:
    """:func:`step_counts` of a full batch: ``max_num_seqs`` requests (prompts spread over the
    plan's input range) over as many of S2's adapters (ranks 64, 32, 16, 8), each its own."""
    used = list(range(min(plan.max_num_seqs, len(paths))))
    names = register(engine, "census", paths, used)
    lo, hi = plan.input_range
    prompts = [[3 + i % 100] * (lo + i * (hi - lo) // len(used)) for i in used]
    try:
        counts = step_counts(engine, prompts, [names[i] for i in used])
    finally:
        for name in names.values():
            engine.remove_adapter(name)
    return {"requests": len(used), "adapters": len(used), **counts}


def register(engine, setting: str, paths: list[Path], used: list[int]) -> dict[int, str]:
    """Registers adapters ``used`` (indices into ``paths``) under ``<setting>-a<i>``, weights
    kept in host memory, reading several at once (``add_adapter`` is thread-safe).

    Returns:
        adapter index -> name.
    Raises:
        RuntimeError: two of them share a content key (they would share pages).
    """
    names = {i: f"{setting}-a{i:04d}" for i in used}
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        added = list(pool.map(lambda i: engine.add_adapter(names[i], paths[i], preload=True),
                              used))
    if len({a.key for a in added}) != len(added):
        raise RuntimeError(f"{setting}: {len(added)} adapters have only "
                           f"{len({a.key for a in added})} distinct content keys")
    return names


def drive(engine, trace: list[TraceRequest], names: dict[int, str], *, online: bool,
          cap_s: float) -> dict:
    """Serves ``trace`` through ``add_request`` and ``step()``: all at t=0 (offline) or each
    once its ``arrival_s`` has passed (online), until every request finishes or ``cap_s``
    seconds; requests still running then are aborted (and drained, leaving the engine empty).

    Returns:
        the row's measurements: seconds, output_tokens, output_tok_s, req_s (finished per
        second), ttft/tpot p50/p90 (seconds), slo_attainment (fraction of the trace with TTFT
        <= SLO_TTFT_S), finished, capped, and per-step figures from ``engine.stats()``.
    Raises:
        RuntimeError: a request finished with an error.
    """
    from pagedlora import SamplingParams

    arrival = [r.arrival_s if online else 0.0 for r in trace]
    waiting = deque(range(len(trace)))  # the trace is in arrival order
    live: dict[int, int] = {}  # request id -> trace index
    first: dict[int, float] = {}  # trace index -> seconds at its first token
    last: dict[int, float] = {}
    tokens = [0] * len(trace)
    finished, steps = 0, 0
    loads_before = _adapter_loads(engine, names.values())
    start = time.perf_counter()
    while waiting or live:
        now = time.perf_counter() - start
        if now >= cap_s:
            break
        while waiting and arrival[waiting[0]] <= now:
            i = waiting.popleft()
            r = trace[i]
            rid = engine.add_request(r.prompt_token_ids, names.get(r.adapter),
                                     SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                    ignore_eos=True))
            live[rid] = i
        if not live:
            time.sleep(max(0.0, min(arrival[waiting[0]], cap_s) - now))
            continue
        outs = engine.step()
        steps += 1
        now = time.perf_counter() - start
        for d in outs:
            i = live[d.request_id]
            if d.new_token_ids:
                first.setdefault(i, now)
                last[i] = now
                tokens[i] += len(d.new_token_ids)
            if d.finished:
                del live[d.request_id]
                if d.output.finish_reason != "length":
                    raise RuntimeError(f"request {i} finished with {d.output.finish_reason}: "
                                       f"{d.output.error}")
                finished += 1
    seconds = time.perf_counter() - start
    capped = bool(waiting or live)
    stats = engine.stats(history=True)
    recent = stats["steps"][-steps:] if steps else []  # the last 1,024 at most
    for rid in live:
        engine.abort(rid)
    while live:
        for d in engine.step():
            if d.finished:
                live.pop(d.request_id, None)
    ttft = [first[i] - arrival[i] for i in first]
    tpot = [(last[i] - first[i]) / (tokens[i] - 1) for i in first if tokens[i] > 1]
    return {
        "seconds": seconds, "output_tokens": sum(tokens),
        "output_tok_s": sum(tokens) / seconds, "req_s": finished / seconds,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p90": percentile(tpot, 0.9),
        "slo_attainment": sum(t <= SLO_TTFT_S for t in ttft) / len(trace),
        "finished": finished, "capped": capped, "steps": steps,
        "mean_batch": sum(s["batch_size"] for s in recent) / max(len(recent), 1),
        "max_adapters_per_step": max((s["num_adapters"] for s in recent), default=0),
        "preemptions": sum(s["num_preempted"] for s in recent),
        "peak_pool_used": 1 - min((s["pages_free"] for s in recent),
                                  default=stats["pages_total"]) / stats["pages_total"],
        "adapter_loads": _adapter_loads(engine, names.values()) - loads_before,
    }


def _adapter_loads(engine, names) -> int:
    """Host -> pool copies of the adapters ``names`` so far."""
    adapters = engine.stats()["adapters"]
    return sum(adapters[n]["loads_from_host"] for n in names)


def run(plan: Plan, out: Path, work: Path) -> dict:
    """Every phase of the benchmark; ``out/gpu_bench.json`` is rewritten after each run, so a
    run stopped by a timeout keeps what it measured.

    Returns:
        the JSON's content: plan, date, environment, phases (seconds), rows (one per setting,
        n and mode; skipped ones say why).
    """
    phases = Phases()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    rows: list[dict] = []
    result = {"plan": asdict(plan), "date": time.strftime("%Y-%m-%d %H:%M"),
              "environment": environment(plan), "phases": phases.seconds, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
        (out / "gpu_bench.md").write_text(markdown(result))

    dtype = getattr(torch, plan.dtype)
    config = llama_config(plan.model)
    phases.done("checks and imports")
    result["backend_check"] = check_backends(plan, work)
    save()
    phases.done("backend check")
    model_dir = write_random_model(work / f"model-{plan.name}", config, dtype=dtype,
                                   device=plan.device)
    result["model_dir"] = str(model_dir)
    phases.done("model files")
    paths = {s: write_setting_adapters(work / f"adapters-{plan.name}-{s}", config, ranks=ranks,
                                       num=max(plan.num_adapters),
                                       distinct=plan.distinct_weights, dtype=dtype)
             for s, ranks in SETTINGS.items()}
    phases.done("adapter files")
    engine = make_engine(plan, model_dir)
    result["environment"]["kernel_backend"] = engine.core.runner.kernel_backend
    phases.done("engine load")
    try:
        warm_up(engine, plan, paths)
        phases.done("warm-up")
        if plan.tensor_parallel_size == 1:
            result["step_census"] = batch_census(engine, plan, paths["S2"])
            save()
            phases.done("step census")
        _runs(engine, plan, config, paths, phases, rows, save)
    finally:
        engine.close()  # the tensor-parallel workers, if any
    save()
    return result


def _runs(engine, plan: Plan, config, paths: dict[str, list[Path]], phases: Phases,
          rows: list[dict], save) -> None:
    """Every (setting, n, mode) run, each row saved as it is done."""
    special = {0, config.bos_token_id, config.eos_token_id}
    register_s = 0.0  # seconds per adapter of the last registration (0 before the first)
    for setting in SETTINGS:
        for n in plan.num_adapters:
            # seed n: S1 and S2 serve the same requests at the same n
            trace = make_trace(WorkloadSpec(plan.num_requests, n, alpha=1.0, rate=plan.rate,
                                            cv=1.0, input_range=plan.input_range,
                                            output_range=plan.output_range, seed=n),
                               config.vocab_size, special)
            used = sorted({r.adapter for r in trace})
            for mode in MODES:
                cap_s = plan.offline_cap_s if mode == "offline" else (
                    trace[-1].arrival_s + plan.online_drain_s)
                row = {"setting": setting, "n": n, "mode": mode, "requests": len(trace),
                       "adapters_used": len(used)}
                # the run's registration counts: as long per adapter as the last one took
                if phases.elapsed() + register_s * len(used) + cap_s > plan.budget_s:
                    rows.append({**row, "skipped": f"past budget_s={plan.budget_s}"})
                    save()
                    continue
                # Registered afresh for each run: it starts with no adapter in the pool and
                # those it uses in host memory.
                started = time.perf_counter()
                names = register(engine, setting, paths[setting], used)
                register_s = (time.perf_counter() - started) / len(used)
                phases.done(f"register {setting} n={n} {mode}: {len(used)} adapters")
                rows.append({**row, **drive(engine, trace, names, online=mode == "online",
                                            cap_s=cap_s)})
                save()
                phases.done(f"{setting} n={n} {mode}")
                for name in names.values():
                    engine.remove_adapter(name)


def markdown(result: dict) -> str:
    """The results as a markdown table, with the machine, versions and workload above it."""
    plan, env = result["plan"], result["environment"]
    m = plan["model"]

    def f(v, scale=1.0, fmt=".2f"):
        return "–" if v is None else format(v * scale, fmt)

    lines = [
        f"{'CPU DRY RUN (not a result), ' if plan['name'] == 'dry-run' else ''}"
        f"{env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']}), triton "
        f"{env['triton']}; kernels {env.get('kernel_backend')}; {result['date']}",
        f"Llama shape hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads, intermediate {m['intermediate_size']}, vocab "
        f"{m['vocab_size']}; random {plan['dtype']} weights. {plan['num_requests']} requests "
        f"per run, prompts {plan['input_range'][0]}-{plan['input_range'][1]} tokens, outputs "
        f"{plan['output_range'][0]}-{plan['output_range'][1]} (greedy, ignore_eos), uniform "
        f"popularity; online: Poisson at {plan['rate']} req/s. tensor parallel "
        f"{plan.get('tensor_parallel_size', 1)}, pool {plan['pool_gb']} GiB per device, "
        f"max_num_seqs = max_loras = {plan['max_num_seqs']}, max_num_batched_tokens "
        f"{plan['max_num_batched_tokens']}, prefix caching off.",
        f"Seconds: {phases_line(result['phases'])}.",
        f"Triton against torch kernels before timing: {result.get('backend_check')}.",
        f"One step's work, a batch of max_num_seqs requests over as many S2 adapters "
        f"(step_census.py): {result.get('step_census', 'not counted')}.",
        "",
        "| setting | n | mode | out tok/s | req/s | finished | TTFT p50 / p90 (s) | "
        "TPOT p50 / p90 (ms) | SLO: TTFT <= 6 s | adapters used | mean batch | "
        "max adapters/step | adapter loads | pool peak | preempted |",
        "|---" * 15 + "|",
    ]
    for r in result["rows"]:
        head = f"| {r['setting']} | {r['n']} | {r['mode']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} |" + " |" * 11)
            continue
        lines.append(
            f"{head} {r['output_tok_s']:.0f} | {r['req_s']:.2f} | {r['finished']}/"
            f"{r['requests']}{' (capped)' if r['capped'] else ''} | {f(r['ttft_p50'])} / "
            f"{f(r['ttft_p90'])} | {f(r['tpot_p50'], 1e3, '.0f')} / "
            f"{f(r['tpot_p90'], 1e3, '.0f')} | {r['slo_attainment']:.0%} | "
            f"{r['adapters_used']} | {r['mean_batch']:.1f} | {r['max_adapters_per_step']} | "
            f"{r['adapter_loads']} | {r['peak_pool_used']:.0%} | {r['preemptions']} |")
    return "\n".join(lines) + "\n"


def phases_line(phases: dict[str, float]) -> str:
    """The setup phases one by one, then registrations, runs and everything summed."""
    registrations = sum(v for k, v in phases.items() if k.startswith("register "))
    runs = sum(v for k, v in phases.items() if k.endswith(MODES))
    setup = [f"{k} {v:.1f}" for k, v in phases.items()
             if not (k.startswith("register ") or k.endswith(MODES))]
    return ", ".join([*setup, f"registrations {registrations:.1f}", f"runs {runs:.1f}",
                      f"total {sum(phases.values()):.1f}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model and counts on the CPU (torch kernels), to check the flow")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_bench_out")),
                        help="folder for gpu_bench.json and gpu_bench.md (default: $OUT, else "
                             "./gpu_bench_out)")
    parser.add_argument("--work-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "pagedlora-gpu-bench",
                        help="model and adapter files, kept for later invocations (the full "
                             "model takes 13.5 GB, the adapters about 1.1 GB)")
    parser.add_argument("--num-requests", type=int, help="requests per run (plan's default)")
    parser.add_argument("--rate", type=float, help="online arrivals, requests/s")
    parser.add_argument("--num-adapters", type=int, nargs="+", help="the n values")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole invocation")
    parser.add_argument("--pool-gb", type=float, help="the unified pool, GiB (per device)")
    parser.add_argument("--tensor-parallel-size", type=int,
                        help="split the model over this many GPUs (worker processes; on the "
                             "CPU with --dry-run, over as many groups of cores)")
    parser.add_argument("--check-only", action="store_true",
                        help="only the Triton-vs-torch check on the tiny model (seconds): "
                             "OUT/backend_check.json; exit status 1 if they disagree")
    args = parser.parse_args(argv)
    plan = DRY_RUN if args.dry_run else H200
    overrides = {k: v for k, v in (("num_requests", args.num_requests), ("rate", args.rate),
                                   ("budget_s", args.budget_s), ("pool_gb", args.pool_gb),
                                   ("tensor_parallel_size", args.tensor_parallel_size))
                 if v is not None}
    if args.num_adapters:
        overrides["num_adapters"] = tuple(args.num_adapters)
    plan = replace(plan, **overrides)
    if args.check_only:
        environment(plan)
        args.out.mkdir(parents=True, exist_ok=True)
        check = check_backends(plan, args.work_dir)
        (args.out / "backend_check.json").write_text(json.dumps(check, indent=1))
        return
    result = run(plan, args.out, args.work_dir)  # writes gpu_bench.md after every run
    print("\n" + markdown(result), flush=True)
    print(f"wrote {args.out / 'gpu_bench.json'} and gpu_bench.md", file=sys.stderr)


if __name__ == "__main__":
    main()
