"""The adapter store's tiers (pool <- host <- spill file <- source) against PEFT on the tiny Llama.

Adapters are written directly as safetensors (support.write_random_lora) so that a thousand take
about a second; reference tokens come from one HF base model into which each PEFT adapter is
injected and unloaded again (support.peft_greedy).
"""

from __future__ import annotations

import errno
import io
import logging
import random
import tarfile
import threading

import pytest
import torch
from support import (
    assert_no_leaks,
    engine_with,
    peft_greedy,
    random_prompt,
    step_until_done,
    write_random_lora,
)
from transformers import AutoModelForCausalLM

from pagedlora import AdapterError, Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

MAX_TOKENS = 4
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPT = random_prompt(7, seed=1)


@pytest.fixture(scope="module")
def hf_base(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def tokens(engine, name, prompt=PROMPT) -> list[int]:
    out = engine.generate([prompt], adapters=name, sampling_params=GREEDY, progress=False)[0]
    assert out.finish_reason == "length", out.error
    return out.token_ids


# -- a thousand adapters ---------------------------------------------------------------------------


def test_thousand_adapters_small_pool_and_host_budget_match_peft(tiny_llama_dir, hf_base,
                                                                 tmp_path):
    rng = random.Random(0)
    dirs = {}
    for i in range(1000):
        targets = sorted(rng.sample(TARGET_MODULES, rng.randint(1, 7)), key=TARGET_MODULES.index)
        dirs[f"a{i}"] = write_random_lora(tmp_path / "src" / f"a{i}", r=rng.randint(4, 64),
                                          target_modules=targets, seed=i)
    spill = tmp_path / "spill"
    engine = engine_with(tiny_llama_dir, 600, max_cpu_loras=16, spill_dir=spill)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    assert engine.adapters.host_keys == []  # registration keeps no weights
    # A hot set (reused, so evicted adapters come back from the spill files) and a cold tail.
    hot = [f"a{i}" for i in range(20)]
    plan = [(rng.choice(hot) if rng.random() < 0.6 else f"a{rng.randrange(1000)}",
             random_prompt(rng.randint(3, 12), seed=1000 + i)) for i in range(150)]
    requests, done, step = [], {}, 0
    while plan or engine.has_unfinished():
        for name, prompt in plan[:4]:  # four arrivals per step
            requests.append((name, prompt, engine.add_request(prompt, name, GREEDY)))
        plan = plan[4:]
        done.update((d.request_id, d.output) for d in engine.step() if d.finished)
        step += 1
        assert len(engine.adapters.host_keys) <= 16, "host budget exceeded"
        resident = engine.adapters.resident_keys
        held = engine.adapters.pages_in_use()
        assert engine.stats()["pages_adapter"] == len(held) == len(set(held))
        assert {p for k in resident for p in engine.adapters.resident(k).shared_pages} == set(
            engine.adapters.shared_pages)
        engine.pool.allocator.check_invariants()
        engine.adapters.check_invariants()
        assert step < 1000
    for _, _, r in requests:
        assert done[r].finish_reason == "length", done[r].error
    for name, prompt, r in rng.sample(requests, 30):
        assert done[r].token_ids == peft_greedy(hf_base, dirs[name], prompt, MAX_TOKENS), name
    stats = engine.stats()["adapters"]
    assert len(list(spill.glob("*.safetensors"))) > 16
    assert sum(s["loads_from_disk"] for s in stats.values()) > 0, "no spill file was reused"
    assert sum(s["evictions"] for s in stats.values()) > 0
    assert sum(s["requests"] for s in stats.values()) == len(requests)
    assert_no_leaks(engine)


# -- identity and removal ------------------------------------------------------------------------


def test_a_b_a_with_other_targets_gives_a_the_same_output(tiny_llama_dir, hf_base, tmp_path):
    a = write_random_lora(tmp_path / "a", r=8, target_modules=list(TARGET_MODULES), seed=1)
    b = write_random_lora(tmp_path / "b", r=4, target_modules=["q_proj", "v_proj"], seed=2)
    # A takes 18 pages and a tail, B 1 and a tail (19 and 2 at most; the tails share one
    # page), a request's KV 2: the pool holds one adapter at a time.
    engine = engine_with(tiny_llama_dir, 21, max_loras=1, max_cpu_loras=0,
                         spill_dir=tmp_path / "spill")
    engine.add_adapter("A", a)
    engine.add_adapter("B", b)
    assert [engine.adapters.footprint(engine.adapters.key_of(n)) for n in "AB"] == [19, 2]
    first = tokens(engine, "A")
    assert tokens(engine, "B") == peft_greedy(hf_base, b, PROMPT, MAX_TOKENS)
    assert engine.adapters.resident_keys == [engine.adapters.key_of("B")]  # A was evicted
    assert tokens(engine, "A") == first == peft_greedy(hf_base, a, PROMPT, MAX_TOKENS)
    assert engine.stats()["adapters"]["A"]["loads_from_disk"] == 1  # back from its spill file
    assert_no_leaks(engine)


def test_remove_then_re_add_with_other_weights(tiny_llama_dir, hf_base, tmp_path):
    old = write_random_lora(tmp_path / "old", r=16, target_modules=list(TARGET_MODULES), seed=3)
    new = write_random_lora(tmp_path / "new", r=4, target_modules=["q_proj", "v_proj"], seed=4)
    spill = tmp_path / "spill"
    engine = engine_with(tiny_llama_dir, 400, max_cpu_loras=0, spill_dir=spill)
    engine.add_adapter("x", old)
    assert tokens(engine, "x") == peft_greedy(hf_base, old, PROMPT, MAX_TOKENS)
    old_key = engine.adapters.key_of("x")
    assert (spill / f"{old_key}.safetensors").is_file()
    engine.remove_adapter("x")
    assert not (spill / f"{old_key}.safetensors").exists()
    assert engine.stats()["pages_adapter"] == 0 and "x" not in engine.stats()["adapters"]
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        engine.generate([PROMPT], adapters="x", progress=False)
    engine.add_adapter("x", new)
    assert engine.adapters.key_of("x") != old_key
    assert tokens(engine, "x") == peft_greedy(hf_base, new, PROMPT, MAX_TOKENS)
    assert_no_leaks(engine)


def test_remove_is_refused_while_requests_use_it(tiny_llama_dir, tmp_path):
    path = write_random_lora(tmp_path / "a", r=4, target_modules=["q_proj"], seed=5)
    engine = engine_with(tiny_llama_dir, 100)
    engine.add_adapter("a", path)
    engine.add_adapter("twin", path)  # same content, same key
    for _ in range(2):
        engine.add_request(PROMPT, "a", GREEDY)
    engine.step()  # both running now
    engine.remove_adapter("twin")  # "a" still names the content: allowed
    with pytest.raises(ValueError, match=r"adapter 'a' is in use by 2 waiting or running"):
        engine.remove_adapter("a")
    step_until_done(engine)
    engine.remove_adapter("a")
    assert engine.adapters.names == []
    assert_no_leaks(engine)


def test_twins_share_pages_and_stats(tiny_llama_dir, tmp_path):
    path = write_random_lora(tmp_path / "a", r=4, target_modules=["q_proj"], seed=6)
    engine = engine_with(tiny_llama_dir, 100)
    engine.add_adapter("one", path)
    engine.add_adapter("two", path)
    assert tokens(engine, "one") == tokens(engine, "two")
    stats = engine.stats()["adapters"]
    assert stats["one"] == stats["two"] and stats["one"]["requests"] == 2
    assert stats["one"]["tokens"] == 2 * (len(PROMPT) + MAX_TOKENS - 1)
    assert stats["one"]["loads_from_host"] == 1 and stats["one"]["tier"] == "pool"


# -- registration ----------------------------------------------------------------------------------


def test_registration_is_lazy_and_preload_keeps_weights(tiny_llama_dir, tmp_path):
    path = write_random_lora(tmp_path / "a", r=4, target_modules=["q_proj"], seed=7)
    engine = engine_with(tiny_llama_dir, 100, max_cpu_loras=1, spill_dir=tmp_path / "spill")
    engine.add_adapter("lazy", path)
    assert engine.adapters.host_keys == [] and engine.stats()["adapters"]["lazy"]["tier"] \
        == "source"
    other = write_random_lora(tmp_path / "b", r=4, target_modules=["v_proj"], seed=8)
    engine.add_adapter("eager", other, preload=True)
    assert engine.adapters.host_keys == [engine.adapters.key_of("eager")]
    engine.adapters.prefetch(engine.adapters.key_of("lazy"))  # evicts "eager" to the disk
    stats = engine.stats()["adapters"]
    assert stats["lazy"]["tier"] == "host" and stats["eager"]["tier"] == "disk"
    assert engine.stats()["pages_adapter"] == 0  # prefetch never touches the pool
    engine.adapters.prefetch("no-such-key")  # a no-op


def test_host_cache_gb_bounds_the_bytes_in_host_memory(tiny_llama_dir, tmp_path):
    one = 2 * 2 * 8 * 64 * 4  # 2 layers x (lora_A + lora_B^T) x rank 8 x 64 wide x float32
    engine = engine_with(tiny_llama_dir, 100, host_cache_gb=2.5 * one / 2**30,
                         spill_dir=tmp_path / "spill")
    for i in range(5):
        path = write_random_lora(tmp_path / f"a{i}", r=8, target_modules=["q_proj"], seed=i)
        assert engine.add_adapter(f"a{i}", path, preload=True).num_bytes == one
        assert engine.adapters.host_bytes <= 2.5 * one
    assert engine.adapters.host_keys == [engine.adapters.key_of(n) for n in ("a3", "a4")]
    tokens(engine, "a0")  # read back from its spill file, the host's oldest copy makes room
    assert engine.adapters.host_keys == [engine.adapters.key_of(n) for n in ("a4", "a0")]
    stats = engine.stats()["adapters"]
    assert stats["a0"]["loads_from_disk"] == 1 and stats["a0"]["tier"] == "pool"
    assert stats["a3"]["tier"] == "disk" and stats["a3"]["evictions"] == 1


def test_add_adapters_from_dir_and_tar_archive(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLORA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "model" / "adapters"
    for i, name in enumerate(["es", "fr"]):
        write_random_lora(root / name, r=4, target_modules=["q_proj"], seed=10 + i)
    engine = engine_with(tiny_llama_dir, 100)
    assert [a.name for a in engine.add_adapters_from_dir(root)] == ["es", "fr"]
    archive = tmp_path / "adapters.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # as `tar czf adapters.tar.gz -C model .`
        tar.add(tmp_path / "model", arcname=".")
    fresh = engine_with(tiny_llama_dir, 100)
    fresh.add_adapters_from_dir(archive)
    assert fresh.adapters.names == ["es", "fr"]
    assert tokens(fresh, "fr") == tokens(engine, "fr")
    assert fresh.adapters.key_of("es") == engine.adapters.key_of("es")


def test_unsafe_archive_and_invalid_member_are_refused(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLORA_CACHE", str(tmp_path / "cache"))
    engine = engine_with(tiny_llama_dir, 100)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped/adapter_config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(AdapterError, match="evil.tar.gz.*OutsideDestinationError"):
        engine.add_adapters_from_dir(evil)
    assert not (tmp_path / "cache" / "escaped").exists()
    root = tmp_path / "adapters"
    write_random_lora(root / "good", r=4, target_modules=["q_proj"], seed=12)
    write_random_lora(root / "wide", r=80, target_modules=["q_proj"], seed=13)
    with pytest.raises(AdapterError, match="'wide'.*exceeds max_lora_rank"):
        engine.add_adapters_from_dir(root)
    assert engine.adapters.names == []  # all or nothing
    with pytest.raises(AdapterError, match="no adapters in"):
        engine.add_adapters_from_dir(tmp_path / "cache")


# -- faults ------------------------------------------------------------------------------------


@pytest.fixture
def two_adapters(tmp_path, hf_base):
    """``(dirs, expected tokens)`` of two adapters, "a" and "b"."""
    dirs = {"a": write_random_lora(tmp_path / "a", r=8, target_modules=["q_proj", "down_proj"],
                                   seed=20),
            "b": write_random_lora(tmp_path / "b", r=4, target_modules=["v_proj"], seed=21)}
    return dirs, {n: peft_greedy(hf_base, d, PROMPT, MAX_TOKENS) for n, d in dirs.items()}


def spilled_engine(model_dir, dirs, spill_dir) -> Engine:
    """Both adapters served once, then evicted from the pool; max_cpu_loras=0, so each has a
    spill file and no host copy."""
    engine = engine_with(model_dir, 200, max_cpu_loras=0, spill_dir=spill_dir)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
        tokens(engine, name)
    engine.adapters.evict_unpinned(engine.pool.num_pages)
    assert {s["tier"] for s in engine.stats()["adapters"].values()} == {"disk"}
    return engine


def both(engine) -> dict:
    outs = engine.generate([PROMPT, PROMPT], adapters=["a", "b"], sampling_params=GREEDY,
                           progress=False)
    return {o.adapter: o for o in outs}


def test_corrupt_or_missing_spill_files_fall_back_to_the_source(tiny_llama_dir, tmp_path,
                                                                two_adapters, caplog):
    dirs, want = two_adapters
    spill = tmp_path / "spill"
    engine = spilled_engine(tiny_llama_dir, dirs, spill)
    file_a = spill / f"{engine.adapters.key_of('a')}.safetensors"
    data = bytearray(file_a.read_bytes())
    data[-5:] = bytes(b ^ 0xFF for b in data[-5:])  # flip weight bytes: still parses
    file_a.write_bytes(bytes(data))
    (spill / f"{engine.adapters.key_of('b')}.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="pagedlora"):
        outs = both(engine)
    assert {n: o.token_ids for n, o in outs.items()} == want
    assert "content hash" in caplog.text and "is gone" in caplog.text
    stats = engine.stats()["adapters"]
    # Once when first served, once again now.
    assert stats["a"]["loads_from_source"] == stats["b"]["loads_from_source"] == 2
    assert stats["a"]["loads_from_disk"] == 0
    assert file_a.is_file()  # rewritten when the fresh copy left host memory
    engine.adapters.evict_unpinned(engine.pool.num_pages)
    assert {n: o.token_ids for n, o in both(engine).items()} == want
    assert engine.stats()["adapters"]["a"]["loads_from_disk"] == 1
    assert_no_leaks(engine)


def test_spill_source_gone_still_served_then_fails_alone(tiny_llama_dir, tmp_path, two_adapters):
    dirs, want = two_adapters
    spill = tmp_path / "spill"
    engine = spilled_engine(tiny_llama_dir, dirs, spill)
    for f in dirs["a"].iterdir():
        f.unlink()
    dirs["a"].rmdir()
    assert {n: o.token_ids for n, o in both(engine).items()} == want  # from the spill file
    engine.adapters.evict_unpinned(engine.pool.num_pages)
    (spill / f"{engine.adapters.key_of('a')}.safetensors").write_bytes(b"garbage")
    outs = both(engine)
    assert outs["a"].finish_reason == "error"
    assert "adapter 'a' cannot be loaded" in outs["a"].error and "not a directory" in \
        outs["a"].error
    assert outs["b"].token_ids == want["b"]
    assert_no_leaks(engine)


def test_source_changed_since_registration_is_an_error(tiny_llama_dir, tmp_path, two_adapters):
    dirs, want = two_adapters
    engine = engine_with(tiny_llama_dir, 200, max_cpu_loras=0, spill_dir=tmp_path / "f" / "x")
    (tmp_path / "f").write_text("a file: nothing can be spilled under it")
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    write_random_lora(dirs["a"], r=8, target_modules=["q_proj", "down_proj"], seed=99)
    outs = both(engine)
    assert outs["a"].finish_reason == "error" and "changed since it was registered" in \
        outs["a"].error
    assert outs["b"].token_ids == want["b"]
    assert_no_leaks(engine)


def test_removed_while_waiting_fails_that_request_alone(tiny_llama_dir, tmp_path, two_adapters,
                                                       caplog):
    """The race remove_adapter cannot see: a request resolved its adapter's key, the adapter
    is removed before the request is queued. The scheduler fails it with the store's error."""
    dirs, want = two_adapters
    engine = engine_with(tiny_llama_dir, 200)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    reqs = [engine.processor.process(PROMPT, engine.adapters.key_of(n), GREEDY,
                                     request_id=engine.processor.next_id()) for n in "ab"]
    engine.adapters.remove("a")  # from another thread, between key lookup and queueing
    ids = [engine.enqueue(r, prompt=PROMPT, adapter=n) for r, n in zip(reqs, "ab", strict=True)]
    done = {d.request_id: d.output for d in engine.step() if d.finished}
    assert list(done) == [ids[0]] and "no longer registered" in done[ids[0]].error
    step_until_done(engine, done)
    assert done[ids[1]].token_ids == want["b"]
    with caplog.at_level(logging.WARNING, logger="pagedlora"):
        key_b = engine.adapters.key_of("b")
        engine.adapters.evict_unpinned(engine.pool.num_pages)
        engine.adapters.prefetch(key_b)  # from the source: fine
        assert engine.adapters.host_keys == [key_b]
        engine.add_adapter("a", dirs["a"])
        for f in dirs["a"].iterdir():
            f.unlink()
        engine.adapters.prefetch(engine.adapters.key_of("a"))  # logged, not raised
    assert "prefetch of adapter" in caplog.text and engine.adapters.host_keys == [key_b]
    assert_no_leaks(engine)


@pytest.mark.parametrize("fault", ["under-a-file", "ENOSPC", "EROFS"])
def test_unwritable_spill_dir_degrades_to_the_source(tiny_llama_dir, tmp_path, two_adapters,
                                                     monkeypatch, caplog, fault):
    dirs, want = two_adapters
    spill = tmp_path / "spill"
    if fault == "under-a-file":
        (tmp_path / "file").write_text("x")
        spill = tmp_path / "file" / "spill"
    else:
        def full(*args, **kwargs):
            raise OSError(getattr(errno, fault), f"injected {fault}")

        monkeypatch.setattr("pagedlora.spill.save_file", full)
    engine = engine_with(tiny_llama_dir, 200, max_cpu_loras=0, spill_dir=spill)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    with caplog.at_level(logging.WARNING, logger="pagedlora"):
        for _ in range(2):
            assert {n: o.token_ids for n, o in both(engine).items()} == want
            engine.adapters.evict_unpinned(engine.pool.num_pages)
    assert "cannot spill adapter 'a'" in caplog.text
    stats = engine.stats()["adapters"]
    assert stats["a"]["tier"] == "source" and stats["a"]["loads_from_source"] == 2
    assert not list(spill.parent.glob("**/*.tmp"))  # no temporary file left behind
    assert_no_leaks(engine)


# -- threads ---------------------------------------------------------------------------------------


def test_add_and_remove_in_another_thread_while_generate_runs(tiny_llama_dir, tmp_path):
    served = {f"s{i}": write_random_lora(tmp_path / f"s{i}", r=4 + i, target_modules=["q_proj"],
                                         seed=30 + i) for i in range(4)}
    churn = [write_random_lora(tmp_path / f"c{i}", r=8, target_modules=["v_proj", "up_proj"],
                               seed=40 + i) for i in range(6)]
    engine = engine_with(tiny_llama_dir, 300, max_cpu_loras=2, spill_dir=tmp_path / "spill")
    for name, path in served.items():
        engine.add_adapter(name, path)
    names = list(served) * 4
    prompts = [random_prompt(5 + i % 7, seed=50 + i) for i in range(len(names))]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in engine.generate(prompts, adapters=names, sampling_params=sp,
                                                 progress=False)]
    stop, errors = threading.Event(), []

    keys = [engine.adapters.key_of(n) for n in served]

    def churner():
        i = 0
        try:
            while not stop.is_set():
                engine.adapters.prefetch(keys[i % len(keys)])  # host copies churn too
                name = f"churn{i % 3}"
                engine.add_adapter(name, churn[i % len(churn)])
                engine.add_adapter(f"{name}-twin", churn[i % len(churn)])
                if i % 2:
                    engine.remove_adapter(name)
                i += 1
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=churner)
    thread.start()
    try:
        for _ in range(3):
            got = engine.generate(prompts, adapters=names, sampling_params=sp, progress=False)
            assert [o.token_ids for o in got] == want
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert_no_leaks(engine)
