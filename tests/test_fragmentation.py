"""Fragmentation stress, short: a mixed-rank trace churns through a small pool under each memory
layout with the pool's invariants asserted after every step; the unified pool must hold more
concurrent requests than the static split at equal memory. And the static layout itself: whole
max-rank slots, at most max_loras resident, the same tokens as the unified pool."""

from __future__ import annotations

import json
import statistics

import pytest
from fragmentation_stress import (
    StressConfig,
    build,
    check_pool,
    run,
    write_random_adapter,
    write_random_llama,
    write_report,
)
from support import assert_no_leaks, check_step

from pagedlora import Engine, SamplingParams

# 16 adapters of ranks 1-32 on q,v or all seven projections, Zipf popularity, 3 adapter slots
# of 80 pages (rank 32 on every projection of both layers) in a pool of 420 pages: the static
# split keeps 180 pages for KV, the unified pool lends adapters only what they use. Requests of
# 1-256 prompt and output tokens arrive for 150 steps, then the engines drain.
CFG = StressConfig(num_steps=150, arrival_rate=1.0, max_len=256, num_adapters=16,
                   pool_pages=420, max_lora_rank=32, max_loras=3, max_cpu_loras=2,
                   max_num_seqs=32, seed=3)


def checks(engine: Engine) -> None:
    check_pool(engine)
    check_step(engine, CFG.max_cpu_loras, CFG.max_loras)  # pins == running requests' adapters


@pytest.fixture(scope="module")
def stressed(tmp_path_factory):
    """``{layout: (engine, Run)}`` after the trace ran and drained, checked at every step, and
    the number of requests in the trace."""
    engines, trace = build(tmp_path_factory.mktemp("frag"), CFG)
    assert len(trace) > 100
    return {e.config.memory_layout: (e, run(e, trace, CFG.num_steps, drain=True, on_step=checks))
            for e in engines}, len(trace)


@pytest.mark.parametrize("layout", ["unified", "static"])
def test_churn_leaks_nothing_and_uses_every_tier(stressed, layout):
    results, num_requests = stressed
    engine, result = results[layout]
    stats = engine.stats()
    assert result.finished == num_requests
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    # What is still allocated is exactly the prefix cache and the resident adapters.
    assert stats["pages_kv"] == stats["pages_kv_cached"]
    assert stats["pages_free"] == (stats["pages_total"] - stats["pages_kv_cached"]
                                   - stats["pages_adapter"])
    adapters = stats["adapters"].values()
    assert sum(a["loads_from_disk"] for a in adapters) > 0  # spilled and read back
    assert sum(a["evictions"] for a in adapters) > 0
    assert stats["admissions_refused"] > 0  # the pool was the limit
    assert_no_leaks(engine)


def test_unified_pool_holds_more_requests_than_the_static_split(stressed):
    results, _ = stressed
    # Over the arrival window, the same steps for both (draining takes each its own time).
    window = {layout: r.series["running"][:CFG.num_steps] for layout, (_, r) in results.items()}
    mean = {layout: statistics.fmean(v) for layout, v in window.items()}
    assert mean["unified"] > 1.2 * mean["static"], mean
    assert max(window["unified"]) >= max(window["static"])
    unified, static = (results[k][1].summary() for k in ("unified", "static"))
    assert unified["mean_resident_adapters"] > static["mean_resident_adapters"]
    assert static["mean_resident_adapters"] <= CFG.max_loras
    assert unified["mean_internal_fragmentation"] < static["mean_internal_fragmentation"]


def test_report_writes_the_series_and_a_png(stressed, tmp_path):
    runs = [r for _, r in stressed[0].values()]
    json_path, png_path = write_report(runs, CFG, tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(json_path.read_text())
    assert saved["summary"]["static"] == runs[1].summary()
    assert len(saved["series"]["unified"]["adapter"]) == runs[0].steps


# -- the static layout on its own ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer random Llama and four adapters: rank 1 on q only, ranks 2-8 on all seven."""
    root = tmp_path_factory.mktemp("static")
    cfg = StressConfig(max_len=64, seed=5)
    model = write_random_llama(root / "model", cfg)
    shapes = Engine(model, pool_gb=0.001).model.module_shapes
    adapters = {"tiny": write_random_adapter(root / "tiny", rank=1, targets=["q_proj"], seed=1,
                                             module_shapes=shapes, num_layers=2)}
    for i, rank in enumerate((2, 5, 8)):
        adapters[f"r{rank}"] = write_random_adapter(
            root / f"r{rank}", rank=rank, targets=list(shapes), seed=10 + i,
            module_shapes=shapes, num_layers=2)
    return model, adapters


def small_engine(small, layout: str, **options) -> Engine:
    model, adapters = small
    options = {"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 1, **options}
    engine = Engine(model, pool_gb=200 * 4096 / 2**30, memory_layout=layout, **options)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_a_small_adapter_takes_a_whole_max_rank_slot(small):
    static, unified = small_engine(small, "static"), small_engine(small, "unified")
    # Rank 8 on all seven projections, each width on pages of its own across both layers:
    # 64-wide rows (lora_A of q,k,v,o,gate,up and lora_B^T of q,o,down: 144 rows, 16 a page)
    # 9 pages, 32-wide (lora_B^T of k,v: 32 rows) 1, 176-wide (lora_A of down, lora_B^T of
    # gate,up: 48 rows, 5 a page) 10: 20.
    assert static.pool.allocator.slot_pages == 20
    assert static.pool.allocator.kv_pages == 200 - 2 * 20
    for engine in (static, unified):
        engine.generate([[5, 6, 7]], adapters="tiny", sampling_params=GREEDY, progress=False)
    # Rank 1 on q: 4 rows 64 wide over both layers, one page, unless padded to a slot.
    assert unified.stats()["pages_adapter"] == 1
    stats = static.stats()
    assert stats["pages_adapter"] == 20 and stats["adapters_resident"] == ["tiny"]
    assert stats["internal_fragmentation"] > unified.stats()["internal_fragmentation"]


def test_static_layout_keeps_at_most_max_loras_adapters_and_matches_unified_tokens(small):
    static, unified = small_engine(small, "static"), small_engine(small, "unified")
    prompts = [[3 + i, 40 + 2 * i, 7, 9 + i] for i in range(8)]
    names = ["tiny", "r2", "r5", "r8", None, "r8", "tiny", "r5"]
    want = unified.generate(prompts, adapters=names, sampling_params=GREEDY, progress=False)
    ids = {static.add_request(p, n, GREEDY): i for i, (p, n) in enumerate(zip(prompts, names,
                                                                         strict=True))}
    got, seen = {}, set()
    while len(got) < len(ids):
        for d in static.step():
            if d.finished:
                got[ids[d.request_id]] = d.output
        check_pool(static)  # at most max_loras=2 resident, each in a whole slot
        stats = static.stats()
        assert stats["pages_adapter"] in (0, 20, 40)
        seen.update(stats["adapters_resident"])
    assert [got[i].token_ids for i in range(8)] == [w.token_ids for w in want]
    # All four were resident at some step, never more than two at once: the others made room.
    assert len(seen) == 4 and len(static.stats()["adapters_resident"]) == 2
    assert len(unified.stats()["adapters_resident"]) == 4  # room for all: none evicted


def test_static_slots_that_leave_no_kv_block_are_refused_naming_the_options(small):
    model, _ = small
    with pytest.raises(ValueError, match=r"memory_layout='static' reserves max_loras=8 adapter "
                                         r"slots of 20 pages \(max_lora_rank=8 on every "
                                         r"projection\), 160 pages; pool_gb=.* holds 100, too few "
                                         r"to add one KV block \(2 pages\)"):
        Engine(model, pool_gb=100 * 4096 / 2**30, memory_layout="static", max_loras=8,
               max_lora_rank=8)
