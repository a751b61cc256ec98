"""Fragmentation stress: requests and adapters churn through a fixed pool, unified vs static.

One random trace (requests of 1 to 2,048 prompt and output tokens, log-uniform so most are
short; adapters of ranks 1 to 128 on q,v or on all seven projections, more of them than fit;
Poisson arrivals between steps; completions when each request reaches its output length) runs
step by step through the real Engine twice, at equal memory:

* ``memory_layout="unified"``: KV blocks and adapter rows share one free list of pages, an
  adapter taking pages in proportion to its rank (S-LoRA, Sheng et al. 2023, section 4.1);
* ``memory_layout="static"``: ``max_loras`` adapter slots, each sized for ``max_lora_rank`` on
  every projection and reserved up front (how vLLM sizes its LoRA buffers), KV blocks in the
  rest.

The model is a small random Llama (no download, token-id prompts, no tokenizer) so that
thousands of steps take minutes on a CPU; the adapters are random PEFT directories
(``adapter_config.json`` + ``adapter_model.safetensors``, both A and B random as PEFT's
``init_lora_weights=False``). ``max_cpu_loras`` is small, so adapters also move through the
host and spill tiers.

Every ``--report-every`` steps it prints pages by kind (KV held, KV cached, adapter, free),
internal fragmentation, running and waiting requests, resident adapters, refused admissions and
preemptions. At the end it prints the comparison and writes ``frag.json`` (the series and the
summaries) and ``frag.png`` (pool occupancy over time, stacked by page kind) to ``--out``::

    python examples/fragmentation_stress.py --steps 3000 --out out/frag
    python examples/fragmentation_stress.py --steps 150 --pool-pages 1200 --max-lora-rank 32 \
        --max-loras 3 --check --out /tmp/frag   # quick: a small pool needs small static slots

``--check`` asserts the pool's invariants after every step (:func:`check_pool`). ``--idle``
only makes every adapter resident and prints the internal fragmentation of their pages
(:func:`idle_fragmentation`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.pool import UnifiedPool
from pagedlora.scheduler import ADAPTER, KV

LAYOUTS = ("unified", "static")
PEFT_PREFIX = "base_model.model.model.layers"
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Page kinds of the plot, bottom to top, with the stats keys that give them.
KINDS = ("kv held", "kv cached", "adapter", "free")


@dataclass(frozen=True)
class StressConfig:
    """The stress run's sizes.

    Attributes:
        num_steps: engine steps of the trace (arrivals happen in ``[0, num_steps)``).
        arrival_rate: mean requests arriving per step (Poisson).
        max_len: longest prompt and longest output, tokens (both log-uniform in [1, max_len]).
        num_adapters: adapters registered (ranks log-uniform over powers of two up to
            ``max_lora_rank``; half on q,v, half on all seven projections).
        zipf: popularity of the i-th adapter (in a shuffled order) is proportional to
            ``i ** -zipf`` (0: uniform; 1: a few hot adapters and a long cold tail, as in
            S-LoRA's power-law workloads).
        base_fraction: share of requests for the base model (no adapter).
        pool_pages: pages in the pool (one page: one KV block of one layer).
        num_layers, hidden_size: of the random Llama (intermediate 176, 4 heads, 2 KV heads).
        block_size: tokens per KV block.
        max_lora_rank, max_loras, max_cpu_loras, max_num_seqs: engine options.
        seed: of the model, the adapters and the trace.
    """

    num_steps: int = 3000
    arrival_rate: float = 0.5
    max_len: int = 2048
    num_adapters: int = 64
    zipf: float = 1.0
    base_fraction: float = 0.1
    pool_pages: int = 4608
    num_layers: int = 2
    hidden_size: int = 64
    block_size: int = 16
    max_lora_rank: int = 128
    max_loras: int = 8
    max_cpu_loras: int = 4
    max_num_seqs: int = 128
    seed: int = 0

    def engine_options(self, layout: str, spill_dir: Path) -> dict:
        """Engine options for ``layout`` (pool_gb gives exactly ``pool_pages`` float32 pages)."""
        page_bytes = 4 * UnifiedPool.page_numel_for(self.block_size, 2, self.hidden_size // 4)
        return dict(pool_gb=(self.pool_pages + 0.5) * page_bytes / 2**30, dtype="float32",
                    memory_layout=layout, block_size=self.block_size,
                    max_lora_rank=self.max_lora_rank, max_loras=self.max_loras,
                    max_cpu_loras=self.max_cpu_loras, max_num_seqs=self.max_num_seqs,
                    max_model_len=2 * self.max_len, spill_dir=spill_dir, seed=self.seed)


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: it arrives before engine step ``step``."""

    step: int
    prompt: list[int]  # token ids
    max_tokens: int
    adapter: str | None


@dataclass
class Run:
    """What one layout did with the trace: one entry per step in each series list."""

    layout: str
    series: dict[str, list] = field(default_factory=lambda: {k: [] for k in SERIES})
    finished: int = 0
    output_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """Max and mean running requests, mean resident adapters, refused admissions,
        preemptions, output tokens per step, finished requests, mean internal fragmentation
        and mean free pages."""
        s = self.series
        return {
            "steps": self.steps,
            "max_running": max(s["running"], default=0),
            "mean_running": _mean(s["running"]),
            "mean_resident_adapters": _mean(s["adapters_resident"]),
            "admissions_refused": s["admissions_refused"][-1] if self.steps else 0,
            "preemptions": s["preemptions"][-1] if self.steps else 0,
            "finished": self.finished,
            "output_tokens_per_step": round(self.output_tokens / max(self.steps, 1), 3),
            "mean_internal_fragmentation": _mean(s["internal_fragmentation"]),
            "mean_pages_free": _mean(s["free"]),
            "seconds": round(self.seconds, 1),
        }


# Per-step series: name -> how it is read from Engine.stats().
SERIES: dict[str, Callable[[dict], float]] = {
    "kv held": lambda st: st["pages_kv"] - st["pages_kv_cached"],
    "kv cached": lambda st: st["pages_kv_cached"],
    "adapter": lambda st: st["pages_adapter"],
    "free": lambda st: st["pages_free"],
    "internal_fragmentation": lambda st: round(st["internal_fragmentation"], 4),
    "running": lambda st: st["requests_running"],
    "waiting": lambda st: st["requests_waiting"],
    "adapters_resident": lambda st: len(st["adapters_resident"]),
    "admissions_refused": lambda st: st["admissions_refused"],
    "preemptions": lambda st: st["preemptions"],
}


def _mean(values: list) -> float:
    return round(statistics.fmean(values), 3) if values else 0.0


# -- model, adapters, trace ----------------------------------------------------------------------


def write_random_llama(path: Path, cfg: StressConfig) -> Path:
    """Saves a random float32 LlamaForCausalLM (vocabulary 512, 4 heads, 2 KV heads,
    intermediate 176, context ``2 * max_len``) without a tokenizer: prompts are token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=512, hidden_size=cfg.hidden_size, intermediate_size=176,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2 * cfg.max_len,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def write_random_adapter(path: Path, *, rank: int, targets: list[str], seed: int,
                         module_shapes: dict[str, tuple[int, int]], num_layers: int) -> Path:
    """Writes a PEFT LoRA directory of rank ``rank`` on ``targets`` in every layer with random
    A ``[rank, in_features]`` and B ``[out_features, rank]`` (float32, ``lora_alpha = 2 *
    rank``), as PEFT saves one made with ``init_lora_weights=False``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in targets:
            in_f, out_f = module_shapes[module]
            key = f"{PEFT_PREFIX}.{layer}.{PARENT[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) / rank**0.5
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "r": rank,
              "lora_alpha": 2 * rank, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def write_adapters(root: Path, cfg: StressConfig, module_shapes: dict[str, tuple[int, int]]
                   ) -> dict[str, Path]:
    """``cfg.num_adapters`` random adapters under ``root``: ranks drawn uniformly from the
    powers of two up to ``max_lora_rank`` (1, 2, 4, ... 128: log-uniform), targets q,v or all
    seven projections with equal odds. Returns ``name -> directory``."""
    rng = random.Random(cfg.seed)
    ranks = [2**i for i in range(int(math.log2(cfg.max_lora_rank)) + 1)]
    adapters = {}
    for i in range(cfg.num_adapters):
        targets = ["q_proj", "v_proj"] if rng.random() < 0.5 else list(TARGET_MODULES)
        adapters[f"a{i}"] = write_random_adapter(
            root / f"a{i}", rank=rng.choice(ranks), targets=targets, seed=cfg.seed * 7919 + i,
            module_shapes=module_shapes, num_layers=cfg.num_layers)
    return adapters


def log_uniform(rng: random.Random, high: int) -> int:
    """An integer in [1, high] whose logarithm is uniform (most draws are short)."""
    return min(high, int(math.exp(rng.uniform(0.0, math.log(high + 1)))))


def make_trace(cfg: StressConfig, adapters: list[str], vocab_size: int) -> list[TraceRequest]:
    """Poisson arrivals of ``arrival_rate`` per step over ``num_steps`` steps; prompt and output
    lengths log-uniform in [1, max_len]; adapters by Zipf popularity (``base_fraction`` on the
    base model). Ordered by arrival step."""
    rng = random.Random(cfg.seed + 1)
    adapters = rng.sample(adapters, len(adapters))  # which adapters are hot: by chance
    weights = [(i + 1) ** -cfg.zipf for i in range(len(adapters))]
    trace, t = [], 0.0
    while True:
        t += rng.expovariate(cfg.arrival_rate)
        if t >= cfg.num_steps:
            return trace
        adapter = (None if rng.random() < cfg.base_fraction
                   else rng.choices(adapters, weights)[0])
        prompt = [rng.randrange(3, vocab_size) for _ in range(log_uniform(rng, cfg.max_len))]
        trace.append(TraceRequest(int(t), prompt, log_uniform(rng, cfg.max_len), adapter))


# -- running it ----------------------------------------------------------------------------------


def build(root: Path, cfg: StressConfig) -> tuple[list[Engine], list[TraceRequest]]:
    """Writes the random model and adapters under ``root``; returns one Engine per layout
    (:data:`LAYOUTS`, each spilling under ``root``) with every adapter registered, and the
    trace."""
    model_dir = write_random_llama(root / "model", cfg)
    engines = [Engine(model_dir, **cfg.engine_options(layout, root / f"spill-{layout}"))
               for layout in LAYOUTS]
    adapters = write_adapters(root / "adapters", cfg, engines[0].model.module_shapes)
    for engine in engines:
        assert engine.pool.num_pages == cfg.pool_pages, engine.pool.num_pages
        engine.add_adapters_from_dir(root / "adapters")
    return engines, make_trace(cfg, sorted(adapters), engines[0].model.embed.shape[0])


def run(engine: Engine, trace: list[TraceRequest], num_steps: int, *, drain: bool = False,
        on_step: Callable[[Engine], None] | None = None, report_every: int = 0) -> Run:
    """Feeds ``trace`` to ``engine`` between steps and records :data:`SERIES` after each.

    Args:
        num_steps: steps to run; with ``drain``, then on until every request has finished.
        on_step: called with the engine after every step (e.g. :func:`check_pool`).
        report_every: print a line every this many steps (0: never).
    """
    result = Run(engine.config.memory_layout)
    pending = iter(trace)
    upcoming = next(pending, None)
    start = time.perf_counter()
    step = 0
    while step < num_steps or (drain and engine.has_unfinished()):
        while upcoming is not None and upcoming.step <= step:
            sp = SamplingParams(max_tokens=upcoming.max_tokens, temperature=0, ignore_eos=True)
            engine.add_request(upcoming.prompt, upcoming.adapter, sp)
            upcoming = next(pending, None)
        for d in engine.step():
            result.output_tokens += len(d.new_token_ids)
            result.finished += d.finished
        if on_step is not None:
            on_step(engine)
        stats = engine.stats()
        for name, read in SERIES.items():
            result.series[name].append(read(stats))
        step += 1
        if report_every and step % report_every == 0:
            print(report_line(result), flush=True)
    result.steps, result.seconds = step, time.perf_counter() - start
    return result


def idle_fragmentation(engine: Engine, names: list[str]) -> dict:
    """Makes each adapter of ``names`` resident (a one-token request each, one after another)
    and measures, with nothing running, the internal fragmentation of the adapter pages: the
    share of their elements that hold no weight, over all of them (``aggregate``: every adapter
    page, the shared tail pages included) and per adapter (``worst``, ``mean``: of the elements
    it holds, its own pages and its spans in shared pages). ``shared_pages`` counts the pages
    holding several adapters' last rows. Adapters evicted for lack of pages are left out
    (``resident`` counts those measured).

    Raises:
        ValueError: KV blocks are still allocated (the idle pool must hold adapters only).
    """
    sp = SamplingParams(max_tokens=1, temperature=0)
    for name in names:
        engine.generate([[3, 4, 5]], name, sp, progress=False)
    page = engine.pool.page_numel
    per = {}
    for name in names:
        try:
            placed = engine.adapters.resident(engine.adapters.key_of(name))
        except KeyError:  # evicted: the pool could not hold every adapter
            continue
        held = len(placed.pages) * page + sum(e - s for _, s, e in placed.spans)
        per[placed.placement_id] = (held, placed.used_elements)  # names may share content
    stats = engine.stats()
    if stats["pages_kv"] != stats["pages_kv_cached"]:
        raise ValueError(f"{stats['pages_kv']} KV pages in use at idle")
    pages = len(engine.adapters.pages_in_use())
    used = sum(u for _, u in per.values())
    waste = [1 - u / held for held, u in per.values()]
    return {"adapters": len(names), "resident": len(per), "pages": pages,
            "shared_pages": len(engine.adapters.shared_pages),
            "aggregate": round(1 - used / (pages * page), 4), "worst": round(max(waste), 4),
            "mean": round(statistics.fmean(waste), 4)}


def report_line(r: Run) -> str:
    """One line of the latest step: pages by kind, fragmentation, requests, adapters."""
    s = {name: values[-1] for name, values in r.series.items()}
    return (f"[{r.layout:7}] step {len(r.series['running']):5}  pages kv "
            f"{s['kv held']:5} cached {s['kv cached']:5} adapter {s['adapter']:5} free "
            f"{s['free']:5}  frag {s['internal_fragmentation']:.3f}  running {s['running']:3} "
            f"waiting {s['waiting']:4}  resident {s['adapters_resident']:3}  refused "
            f"{s['admissions_refused']:5} preempted {s['preemptions']:4}")


def check_pool(engine: Engine) -> None:
    """Asserts the pool's accounting between steps: the allocator's and the KV blocks'
    invariants, every block-table page of kind "kv", every resident adapter page of kind
    "adapter" and held by one adapter only, no page both, kinds adding up to the pool, at most
    ``max_loras`` adapters among running requests (and resident, in the static layout), at most
    ``max_cpu_loras`` in host memory.

    Raises:
        AssertionError: naming what broke.
    """
    sched, store, alloc, config = (engine.core.scheduler, engine.adapters,
                                   engine.pool.allocator, engine.config)
    sched.kv.check_invariants(sched.running)  # also the allocator's own
    kv_pages = {p for r in sched.running for block in sched.kv.blocks_of(r) for p in block}
    bad = [p for p in kv_pages if alloc.kind_of(p) != KV]
    assert not bad, f"block-table pages {bad[:5]} are not kv pages"
    adapter_pages = store.pages_in_use()
    assert len(set(adapter_pages)) == len(adapter_pages) == alloc.num_used(ADAPTER), (
        f"{len(adapter_pages)} adapter pages held ({len(set(adapter_pages))} distinct), "
        f"{alloc.num_used(ADAPTER)} adapter pages allocated")
    store.check_invariants()
    resident = [store.resident(k) for k in store.resident_keys]
    assert not any(a.overlaps(b) for i, a in enumerate(resident) for b in resident[i + 1:]), (
        "two resident adapters hold one pool element")
    bad = [p for p in adapter_pages if alloc.kind_of(p) != ADAPTER]
    assert not bad, f"adapter pages {bad[:5]} are not adapter pages"
    assert not kv_pages & set(adapter_pages), "a page is both KV and adapter"
    assert alloc.num_used(KV) + alloc.num_used(ADAPTER) + alloc.num_free == alloc.num_pages
    running_adapters = {r.adapter_key for r in sched.running} - {None}
    assert len(running_adapters) <= config.max_loras, f"{len(running_adapters)} adapters run"
    if config.memory_layout == "static":
        assert len(store.resident_keys) <= config.max_loras, "more adapters than slots"
    if config.max_cpu_loras is not None:
        assert len(store.host_keys) <= config.max_cpu_loras, "host tier over max_cpu_loras"


# -- report --------------------------------------------------------------------------------------


def write_report(runs: list[Run], cfg: StressConfig, out: Path) -> tuple[Path, Path]:
    """Writes ``frag.json`` (config, summaries, series) and ``frag.png`` (per layout, pages by
    kind stacked over steps with running requests on a second axis; internal fragmentation of
    both below) into ``out``. Returns the two paths."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg for PNG

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "frag.json", out / "frag.png"
    json_path.write_text(json.dumps({
        "config": asdict(cfg),
        "summary": {r.layout: r.summary() for r in runs},
        "series": {r.layout: r.series for r in runs}}))
    fig = Figure(figsize=(10, 3 * len(runs) + 2.5), layout="constrained")
    axes = fig.subplots(len(runs) + 1, 1, sharex=True,
                        height_ratios=[3] * len(runs) + [2])
    colors = ("tab:blue", "tab:cyan", "tab:orange", "0.9")
    most_running = max(max(r.series["running"], default=0) for r in runs) * 1.05 or 1
    for ax, r in zip(axes[:-1], runs, strict=True):
        steps = range(len(r.series["running"]))
        areas = ax.stackplot(steps, *(r.series[k] for k in KINDS), colors=colors)
        ax.set_ylim(0, cfg.pool_pages)
        ax.set_ylabel("pages")
        summary = r.summary()
        ax.set_title(f"{r.layout}: mean running {summary['mean_running']:.1f}, mean resident "
                     f"adapters {summary['mean_resident_adapters']:.1f}, refused admissions "
                     f"{summary['admissions_refused']}", fontsize="medium")
        twin = ax.twinx()  # one scale for both layouts, so the lines compare
        (line,) = twin.plot(steps, r.series["running"], color="black", linewidth=0.7)
        twin.set_ylim(0, most_running)
        twin.set_ylabel("running requests")
    fig.legend([*areas, line], [*(f"{k} pages" for k in KINDS), "running requests"],
               loc="outside lower center", ncols=5, fontsize="small")
    frag = axes[-1]
    for r in runs:
        frag.plot(r.series["internal_fragmentation"], label=r.layout, linewidth=0.8)
    frag.set_ylabel("internal fragmentation")
    frag.set_xlabel("step")
    frag.set_ylim(0, 1)
    frag.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"Pool of {cfg.pool_pages} pages, {cfg.num_adapters} adapters (ranks 1-"
                 f"{cfg.max_lora_rank}), max_loras={cfg.max_loras}, same trace")
    fig.savefig(png_path, dpi=80)
    return json_path, png_path


def comparison_table(runs: list[Run]) -> str:
    """A Markdown table of the runs' summaries, one column per layout."""
    summaries = [r.summary() for r in runs]
    lines = ["| | " + " | ".join(r.layout for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for key in summaries[0]:
        lines.append(f"| {key} | " + " | ".join(str(s[key]) for s in summaries) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = StressConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=defaults.num_steps)
    p.add_argument("--rate", type=float, default=defaults.arrival_rate,
                   help="mean arrivals per step")
    p.add_argument("--max-len", type=int, default=defaults.max_len)
    p.add_argument("--adapters", type=int, default=defaults.num_adapters)
    p.add_argument("--zipf", type=float, default=defaults.zipf,
                   help="adapter popularity exponent (0: uniform)")
    p.add_argument("--pool-pages", type=int, default=defaults.pool_pages)
    p.add_argument("--max-loras", type=int, default=defaults.max_loras)
    p.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank)
    p.add_argument("--max-cpu-loras", type=int, default=defaults.max_cpu_loras)
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--layers", type=int, default=defaults.num_layers)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--report-every", type=int, default=250)
    p.add_argument("--check", action="store_true", help="assert pool invariants every step")
    p.add_argument("--out", type=Path, default=Path("out/frag"))
    p.add_argument("--idle", action="store_true",
                   help="only measure the adapters' idle fragmentation (no trace)")
    args = p.parse_args(argv)
    cfg = StressConfig(num_steps=args.steps, arrival_rate=args.rate, max_len=args.max_len,
                       num_adapters=args.adapters, zipf=args.zipf, pool_pages=args.pool_pages,
                       max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                       max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                       num_layers=args.layers, seed=args.seed)
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a shared machine
    with tempfile.TemporaryDirectory(prefix="frag-") as tmp:
        engines, trace = build(Path(tmp), cfg)
        if args.idle:
            idle = idle_fragmentation(engines[0], sorted(engines[0].adapters.names))
            print("idle adapter pages (unified):", json.dumps(idle))
            return 0
        print(f"{len(trace)} requests over {cfg.num_steps} steps, {cfg.num_adapters} adapters, "
              f"pool of {cfg.pool_pages} pages", flush=True)
        runs = [run(engine, trace, cfg.num_steps, report_every=args.report_every,
                    on_step=check_pool if args.check else None) for engine in engines]
    json_path, png_path = write_report(runs, cfg, args.out)
    print(comparison_table(runs))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
