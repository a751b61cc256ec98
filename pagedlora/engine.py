"""Engine: one base model, many LoRA adapters, one unified paged pool, continuous batching."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from pagedlora.adapter_dirs import adapter_dirs
from pagedlora.adapter_pages import packed_pages
from pagedlora.adapter_store import AdapterStore
from pagedlora.config import EngineConfig
from pagedlora.detokenizer import Detokenizer
from pagedlora.errors import AdapterUnavailableError
from pagedlora.lora_adapter import LoraAdapter
from pagedlora.model import LlamaModel
from pagedlora.model_files import load_weights, resolve_model
from pagedlora.model_runner import ModelRunner
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.pool import UnifiedPool
from pagedlora.prefetcher import Prefetcher
from pagedlora.sampler import sample
from pagedlora.sampling_params import SamplingParams
from pagedlora.scheduler import (
    ADAPTER,
    KV,
    PageAllocator,
    Request,
    Scheduler,
    StaticSplitAllocator,
)
from pagedlora.spill import SpillDir

Prompt = str | list[dict] | list[int]


@dataclass
class _Tracked:
    """What the engine keeps of a request beyond the scheduler's view, until it finishes."""

    request: Request
    index: int  # position in the submitting call
    prompt: Prompt
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator
    detokenizer: Detokenizer
    num_streamed: int = 0  # output tokens already handed out as StreamOutputs
    # receives the request's StreamOutputs: the inbox of the generate/stream call that
    # submitted it (shared by that call's requests), add_request's on_output, or None
    sink: Callable[[StreamOutput], None] | None = None


class Engine:
    """Serves a base LLM and many unmerged LoRA adapters from one unified paged pool.

    Example::

        engine = Engine(model=None, pool_gb=1.0)          # None: SmolLM2-135M-Instruct
        engine.add_adapter("upper", "adapters/upper")      # a PEFT directory
        outs = engine.generate(["Name a color.", "What is 2+2?"], adapters=["upper", None],
                               sampling_params=SamplingParams(max_tokens=64, temperature=0))

    Args:
        model: an HF directory (config.json + *.safetensors), a ``.gguf`` file (dequantized
            once and cached under ``$PAGEDLORA_CACHE``), or None for the embedded default.
        pool_gb: size of the unified pool in GiB.
        **options: the other fields of :class:`EngineConfig` (dtype, device, block_size,
            kernel_backend, max_num_seqs, max_num_batched_tokens, max_model_len, max_loras,
            max_lora_rank, memory_layout, seed, policy, policy_max_wait_s, watermark,
            enable_prefix_caching, ttft_deadline_s, max_cpu_loras, host_cache_gb, spill_dir).

    Raises:
        TypeError: an unknown option. ValueError: an invalid option or model, or a pool too small
        for one KV block (next to the adapter slots, with ``memory_layout="static"``).
        FileNotFoundError: a missing model (the message says how to install the default one).
    """

    def __init__(self, model: str | os.PathLike | None = None, pool_gb: float = 1.0,
                 **options) -> None:
        self.config = config = EngineConfig.from_options(pool_gb, **options)
        self.model_dir = resolve_model(model)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = self._load_tokenizer(self.model_dir)
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        dtype = getattr(torch, config.dtype)
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r}, but this torch build "
                             f"({torch.__version__}) sees no CUDA device; use device='cpu'")
        self.model = LlamaModel(hf_config, load_weights(self.model_dir), dtype=dtype,
                                device=device, max_model_len=self.max_model_len,
                                kernel_backend=config.kernel_backend)
        m = self.model
        geometry = dict(block_size=config.block_size, num_kv_heads=m.num_kv_heads,
                        head_dim=m.head_dim)
        num_pages = UnifiedPool.pages_for_bytes(pool_gb * 2**30, dtype=dtype, **geometry)
        if num_pages < m.num_layers:
            raise ValueError(f"pool_gb={pool_gb} holds {num_pages} pages; one KV block takes "
                             f"{m.num_layers} (one per layer)")
        allocator = self._allocator(num_pages, UnifiedPool.page_numel_for(**geometry))
        self.pool = UnifiedPool(num_pages, dtype=dtype, device=device, allocator=allocator,
                                **geometry)
        self.pool.tensor.zero_()  # padding slots are read (and masked); keep them finite
        self.adapters = AdapterStore(self.pool, num_layers=m.num_layers,
                                     module_shapes=m.module_shapes,
                                     max_lora_rank=config.max_lora_rank,
                                     max_cpu_loras=config.max_cpu_loras,
                                     host_cache_bytes=None if config.host_cache_gb is None
                                     else int(config.host_cache_gb * 2**30),
                                     spill=SpillDir(config.spill_dir))
        self.scheduler = Scheduler(config, pages_per_block=m.num_layers,
                                   allocator=self.pool.allocator, adapters=self.adapters)
        self.runner = ModelRunner(m, self.pool, self.adapters)
        self.prefetcher = Prefetcher(self.adapters.prefetch)
        eos = hf_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._next_id = 0
        self._tracked: dict[int, _Tracked] = {}  # request id -> state, until it finishes
        self._aborts: set[int] = set()  # request ids to abort at the next step (any thread)
        # Outputs of requests added without a sink (add_request, no on_output) that no
        # step() has returned yet: made at add time, or by the steps generate/stream run.
        self._ready: list[StreamOutput] = []
        self._unclaimed: list[StreamOutput] = []  # the current step's sinkless outputs
        self._abort_lock = threading.Lock()
        self._peak: dict = {}  # stats() at the fullest step of the last generate call
        self._num_generated = 0  # output tokens sampled by this engine, for tokens/s
        self._steps: deque[dict] = deque(maxlen=1024)  # per-step metrics, newest last

    def _allocator(self, num_pages: int, page_numel: int) -> PageAllocator:
        """The pool's page allocator for ``config.memory_layout``: one free list ("unified"),
        or max_loras slots sized for max_lora_rank on every projection of every layer, with
        the rest for KV blocks ("static", vLLM's LoRA buffers).

        Raises:
            ValueError: "static" slots leave no room for one KV block.
        """
        config, m = self.config, self.model
        if config.memory_layout == "unified":
            return PageAllocator(num_pages)
        every_module = {(layer, module): config.max_lora_rank
                        for layer in range(m.num_layers) for module in m.module_shapes}
        slot = packed_pages(every_module, m.module_shapes, page_numel)
        if num_pages - config.max_loras * slot < m.num_layers:
            raise ValueError(
                f"memory_layout='static' reserves max_loras={config.max_loras} adapter slots of "
                f"{slot} pages (max_lora_rank={config.max_lora_rank} on every projection), "
                f"{config.max_loras * slot} pages; pool_gb={config.pool_gb} holds {num_pages}, "
                f"too few to add one KV block ({m.num_layers} pages): raise pool_gb or lower "
                f"max_loras or max_lora_rank")
        return StaticSplitAllocator(num_pages, slot_pages=slot, num_slots=config.max_loras)

    @staticmethod
    def _load_tokenizer(model_dir: Path):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((model_dir / n).is_file() for n in names):
            return None  # token-id prompts only
        return AutoTokenizer.from_pretrained(model_dir)

    # -- adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike, preload: bool = False
                    ) -> LoraAdapter:
        """Registers the PEFT LoRA adapter in ``path`` under ``name``.

        Cheap: the config is checked and the weights are read once to validate and hash them
        (XXH3-128 of the content is the adapter's identity), then dropped unless ``preload``
        keeps them in host memory; they are read again from the disk when a request needs
        them. Thread-safe: may run while ``generate`` runs in another thread. Re-adding a name
        with other weights makes a new adapter; requests already queued keep the old one.

        Raises:
            AdapterError (a ValueError): missing files, bad config, shapes that do not fit the
                model, rank above max_lora_rank, NaN/Inf, unknown dtype or target modules,
                module paths of another architecture.
            UnsupportedAdapterError (a NotImplementedError): DoRA, biases, modules_to_save,
                embedding/lm_head LoRA.
        """
        return self.adapters.add(name, path, preload=preload)

    def add_adapters_from_dir(self, root: str | os.PathLike, preload: bool = False
                              ) -> list[LoraAdapter]:
        """Registers every ``root/<name>/`` PEFT directory under its folder's name (SageMaker
        LMI's ``adapters/`` layout); ``root`` may be a ``.tar.gz`` archive of it, extracted
        safely into the cache. All or nothing: one invalid adapter registers none.

        Raises:
            AdapterError, UnsupportedAdapterError: as :meth:`add_adapter`, naming the adapter;
                also no adapter found, an unreadable archive or one with unsafe paths.
        """
        return self.adapters.add_many(adapter_dirs(root).items(), preload=preload)

    def remove_adapter(self, name: str) -> None:
        """Unregisters ``name``; its pages, host copy and spill file are freed unless another
        name has the same content. The name can then be added again. Thread-safe.

        Raises:
            ValueError: no adapter of that name, or requests for it are waiting or running
                (and no other name shares its content).
        """
        self.adapters.remove(name)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 adapters: str | None | Sequence[str | None] = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = True) -> list[RequestOutput]:
        """Generates for every prompt, batching them continuously; results in prompt order.

        Args:
            prompts: one prompt or a list; a prompt is a string, a list of chat messages
                (``{"role", "content"}`` dicts, rendered with the model's chat template), or a
                list of token ids.
            adapters: one adapter name (or None, the base model) per prompt, or one for all.
            sampling_params: one for all, one per prompt, or None (defaults).
            progress: show a tqdm bar of finished requests and output tokens/s.
        Returns:
            one RequestOutput per prompt. An empty prompt, one of max_model_len tokens or more,
            or token ids outside the vocabulary get finish_reason "error" and a message; the
            others run normally. If generate itself is interrupted (an exception, Ctrl-C), its
            requests are aborted and their pages freed before the exception propagates.
        Raises:
            ValueError: an adapter name never added (before any work starts), or lists whose
                lengths differ from the prompts'.
        """
        inbox: deque[StreamOutput] = deque()
        tracked = self._submit(prompts, adapters, sampling_params, inbox.append)
        outputs: dict[int, RequestOutput] = {}
        bar = tqdm(total=len(tracked), disable=not progress, unit="req", desc="generate")
        start, generated_before = time.perf_counter(), self._num_generated
        self._peak = {}
        self._record_peak()
        try:
            for d in self._drive(tracked, inbox):
                if d.finished:
                    outputs[d.request_id] = d.output
                    bar.update(1)
                    tokens = self._num_generated - generated_before
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}",
                                    refresh=False)
        except BaseException:
            # Leave nothing behind: a later call must not inherit this call's requests or pages.
            self._abort_now(tracked)
            raise
        finally:
            bar.close()
        return [outputs[t.request.request_id] for t in tracked]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               adapters: str | None | Sequence[str | None] = None,
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamOutput]:
        """Like :meth:`generate`, but yields each request's new tokens and text as the steps
        produce them; a request's last StreamOutput has ``finished=True`` and its complete
        RequestOutput. Closing the iterator early (``close()``, ``break``, garbage collection)
        aborts the requests still running and frees their pages. Several streams (and
        ``generate`` calls) may be consumed interleaved in one thread: whichever steps the
        engine, each gets exactly its own requests' outputs.

        Args and errors: as for :meth:`generate` (no progress bar).
        """
        inbox: deque[StreamOutput] = deque()
        tracked = self._submit(prompts, adapters, sampling_params, inbox.append)
        try:
            yield from self._drive(tracked, inbox)
        finally:
            self._abort_now(tracked)

    def _drive(self, tracked: list[_Tracked], inbox: deque[StreamOutput]
               ) -> Iterator[StreamOutput]:
        """Yields the StreamOutputs of ``tracked`` (one call's requests, sharing ``inbox``)
        until all have finished, stepping the engine whenever the inbox is empty; steps also
        fill other calls' inboxes."""
        remaining = len(tracked)
        while remaining:
            if not inbox:
                # Outputs of add_request's sinkless requests are kept for the caller's next
                # step(), not dropped with this step's return value.
                self._step()
                self._ready.extend(self._unclaimed)
                self._unclaimed = []
                continue
            d = inbox.popleft()
            remaining -= d.finished
            yield d

    def add_request(self, prompt: Prompt, adapter: str | None = None,
                    sampling_params: SamplingParams | None = None,
                    on_output: Callable[[StreamOutput], None] | None = None) -> int:
        """Queues one request and returns at once, without stepping (vLLM's
        ``LLMEngine.add_request``): for callers that drive :meth:`step` themselves, e.g. an
        online benchmark adding requests as they arrive, or the HTTP server's engine loop. The
        request's StreamOutputs are returned by the following ``step()`` calls (an invalid
        prompt's, with finish_reason "error", by the next one). Its arrival time, for TTFT, is
        now. ``add_request`` and ``step`` belong to one thread (``abort``, ``add_adapter`` and
        ``remove_adapter`` may come from any).

        Args: as for :meth:`generate`, for one prompt, and
            on_output: if given, also called with each of the request's StreamOutputs as it
                is made, in the thread that calls ``step()``; a prompt that fails at once
                (empty, too long, token ids outside the vocabulary, too large for the pool)
                has its "error" output handed to it within this call instead of by the next
                ``step()``. It must not raise.
        Returns:
            the request id (for :meth:`abort`, and in its StreamOutputs).
        Raises:
            ValueError: an adapter name never added.
        """
        (t,) = self._submit([prompt], [adapter], [sampling_params or SamplingParams()],
                            on_output)
        return t.request.request_id

    def abort(self, request_id: int) -> bool:
        """Asks for a request to finish with "abort"; its pages are freed at the next step.
        Safe to call from any thread.

        Returns:
            False when no such request is running or waiting (unknown or already finished).
        """
        if request_id not in self._tracked:
            return False
        with self._abort_lock:
            self._aborts.add(request_id)
        return True

    def step(self) -> list[StreamOutput]:
        """Runs one scheduler step, the forward pass and sampling (``generate`` and ``stream``
        loop on it).

        Returns:
            one StreamOutput per request that got a token or finished in this step (stop,
            length, abort or error), after those of requests queued by :meth:`add_request`
            without ``on_output`` that no step() has returned yet (prompts it failed, and
            outputs made while a ``generate`` or ``stream`` call stepped the engine).
        Raises:
            RuntimeError: requests wait but none could be scheduled (a bug: ``Scheduler.add``
                fails requests that can never fit).
        """
        ready, self._ready = self._ready, []
        return ready + self._step()

    def _step(self) -> list[StreamOutput]:
        """One step (see :meth:`step`); returns this step's StreamOutputs only. Those of
        requests without a sink are also in ``_unclaimed``."""
        self._unclaimed = []
        with self._abort_lock:
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            t = self._tracked.get(rid)
            if t is not None:
                self.scheduler.finish(t.request, "abort")
        started = time.perf_counter()
        out = self.scheduler.schedule()
        changed = [*out.failed, *out.aborted]
        changed += [t.request for rid in aborts if (t := self._tracked.get(rid)) is not None]
        if not out.scheduled:
            if not changed and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the pool")
            return [self._emit(self._tracked[r.request_id]) for r in changed]
        self.adapters.record_use(out.scheduled)
        upcoming = self.scheduler.next_adapters(self.config.max_loras)
        self.prefetcher.ask(k for k in upcoming if self.adapters.tier(k) in ("disk", "source"))
        sampled, logits = self.runner.run(out)
        self.scheduler.update(out)
        self._warm_pool(upcoming)
        if sampled:
            states = [self._tracked[r.request_id] for r in sampled]
            tokens = sample(logits, [t.params for t in states], [t.generator for t in states])
            self._num_generated += len(tokens)
            now = time.perf_counter()
            for t, token in zip(states, tokens, strict=True):
                r = t.request
                r.output_token_ids.append(token)
                t.detokenizer.push(token)
                if r.first_token_time is None:
                    r.first_token_time = now
                reason = self._stop_reason(t)
                if reason is not None:
                    self.scheduler.finish(r, reason)
            changed += sampled
        self._steps.append({
            "batch_size": len(out.scheduled), "num_tokens": out.num_batched_tokens,
            "num_adapters": len(out.adapter_keys), "num_preempted": len(out.preempted),
            "pages_free": self.pool.allocator.num_free,
            "seconds": time.perf_counter() - started})
        self._record_peak()
        return [self._emit(self._tracked[r.request_id]) for r in changed]

    def _warm_pool(self, keys: list[str]) -> None:
        """Copies prefetched adapters (already in host memory) into free pool pages, unpinned,
        so their first requests need not wait for the copy; only pages that are free beyond the
        scheduler's watermark are used, and nothing is evicted for it."""
        for key in keys:
            fits = self.pool.allocator.fits(self.scheduler.watermark_pages,
                                            self.adapters.pages_needed(key))
            if self.adapters.tier(key) == "host" and fits:
                try:
                    if self.adapters.acquire(key):
                        self.adapters.release(key)
                except AdapterUnavailableError:
                    pass  # its request fails with the reason when admitted

    def _submit(self, prompts, adapters, sampling_params,
                sink: Callable[[StreamOutput], None] | None) -> list[_Tracked]:
        """Tokenizes and queues the prompts (see :meth:`generate` for the arguments); their
        StreamOutputs go to ``sink`` (as well as to step()'s return); without one, those made
        here (prompts that fail at once) are returned by the next step()."""
        prompts = self._as_list(prompts)
        names = self._per_prompt(adapters, len(prompts), "adapters")
        params = self._per_prompt(sampling_params or SamplingParams(), len(prompts),
                                  "sampling_params")
        keys = [None if n is None else self.adapters.key_of(n) for n in names]
        tracked = []
        try:
            for i, (p, name, key, sp) in enumerate(zip(prompts, names, keys, params,
                                                       strict=True)):
                r = self._new_request(p, key, sp, index=i, adapter=name, sink=sink)
                tracked.append(self._tracked[r.request_id])
        except BaseException:  # nothing of this call stays tracked
            for t in tracked:
                self._tracked.pop(t.request.request_id, None)
            raise
        for t in tracked:
            if not t.request.is_finished:
                self.scheduler.add(t.request)
            if t.request.is_finished:  # an invalid prompt, or one that can never fit the pool
                d = self._emit(t)
                if sink is None:
                    self._ready.append(d)  # handed out by the next step()
        return tracked

    def _abort_now(self, tracked: list[_Tracked]) -> None:
        """Finishes the unfinished requests of ``tracked`` with "abort" and forgets them."""
        for t in tracked:
            self.scheduler.finish(t.request, "abort")
            self._tracked.pop(t.request.request_id, None)

    def _emit(self, t: _Tracked) -> StreamOutput:
        """What ``t``'s request gained since its last StreamOutput, also handed to its
        sink; a finished request's last one carries its RequestOutput, and the engine forgets
        the request."""
        r = t.request
        finished = r.is_finished
        if finished:
            self._tracked.pop(r.request_id, None)
        new = r.output_token_ids[t.num_streamed:]
        t.num_streamed = len(r.output_token_ids)
        d = StreamOutput(request_id=r.request_id, index=t.index, new_token_ids=new,
                         new_text=t.detokenizer.new_text(finished=finished), finished=finished,
                         output=self._output(t) if finished else None)
        if t.sink is not None:
            t.sink(d)
        else:
            self._unclaimed.append(d)
        return d

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Pool accounting and scheduling metrics now.

        Returns:
            dict with ``pages_total``, ``pages_kv`` (held by requests or cached),
            ``pages_kv_cached`` (cached blocks no request holds: reusable, and freed first when
            pages run short), ``pages_adapter``, ``pages_free``, ``page_bytes``,
            ``internal_fragmentation`` (fraction of the elements in used pages that hold
            nothing), ``adapters_resident`` (names), ``requests_running``,
            ``requests_waiting``, ``admissions_refused`` (steps whose admission stopped for
            lack of pages, since the engine started), ``preemptions`` (requests preempted for
            lack of pages, since the engine started), ``prefix_cache`` (``hit_tokens`` and
            ``queried_tokens``: prompt tokens served from the cache and looked up, since the
            engine started), ``steps``
            (the last 1,024 steps, oldest first: ``batch_size``, ``num_tokens``,
            ``num_adapters``, ``num_preempted``, ``pages_free`` at the end of the step,
            ``seconds``),
            ``peak``: the pool numbers at the step of the last ``generate`` call that held
            the most pages, and ``adapters``: per adapter name, ``tier`` ("pool", "host",
            "disk" or "source", the fastest holding it), ``requests``, ``tokens``,
            ``loads_from_disk`` (spill file reads), ``loads_from_source``, ``loads_from_host``
            (copies into the pool), ``evictions`` (from the pool or host memory) and
            ``last_used`` (``time.time()``); names sharing content share these counters.
        """
        alloc, pool, kv = self.pool.allocator, self.pool, self.scheduler.kv
        bs = pool.block_size
        filled = dict.fromkeys(range(kv.evictable_pages // self.model.num_layers), bs)
        for r in self.scheduler.running:
            for i, block in enumerate(r.blocks):
                tokens = min(bs, max(0, r.num_computed_tokens - i * bs))
                filled[("b", block[0])] = max(filled.get(("b", block[0]), 0), tokens)
        kv_elems = sum(filled.values()) * pool.page_numel // bs * self.model.num_layers
        ad_elems = sum(self.adapters.resident(k).used_elements
                       for k in self.adapters.resident_keys)
        allocated = (alloc.num_used(KV) + alloc.num_used(ADAPTER)) * pool.page_numel
        return {
            "pages_total": alloc.num_pages,
            "pages_kv": alloc.num_used(KV),
            "pages_kv_cached": kv.evictable_pages,
            "pages_adapter": alloc.num_used(ADAPTER),
            "pages_free": alloc.num_free,
            "page_bytes": pool.page_numel * pool.tensor.element_size(),
            "internal_fragmentation": 1 - (kv_elems + ad_elems) / allocated if allocated else 0.0,
            "adapters_resident": sorted(n for k in self.adapters.resident_keys
                                        for n in self.adapters.names_of(k)),
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "admissions_refused": self.scheduler.num_refused_admissions,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache": {"hit_tokens": kv.hit_tokens, "queried_tokens": kv.queried_tokens},
            "steps": list(self._steps),
            "peak": dict(self._peak),
            "adapters": self.adapters.stats(),
        }

    def _record_peak(self) -> None:
        free = self.pool.allocator.num_free
        if free < self._peak.get("pages_free", self.pool.num_pages + 1):
            self._peak = {k: v for k, v in self.stats().items() if k.startswith("pages")
                          or k in ("internal_fragmentation", "adapters_resident",
                                   "requests_running", "requests_waiting")}

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string, chat messages, token ids or a list of "
                            f"those, got {type(prompts).__name__}")
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], (dict, int)):
            return [prompts]  # one chat conversation or one token-id prompt
        return prompts

    @staticmethod
    def _per_prompt(value, n: int, what: str) -> list:
        if value is None or isinstance(value, (str, SamplingParams)):
            return [value] * n
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{what} must be one value for all prompts or a list of one per "
                            f"prompt, got {type(value).__name__}")
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
        want, wanted = ((SamplingParams, "a SamplingParams") if what == "sampling_params"
                        else ((str, type(None)), "a name or None"))
        bad = [i for i, v in enumerate(value) if not isinstance(v, want)]
        if bad:
            got = type(value[bad[0]]).__name__
            raise TypeError(f"{what}[{bad[0]}] has type {got}; expected {wanted}")
        return value

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids the engine would run for ``prompt`` (a string as is, chat messages
        through the model's chat template with the generation prompt, token ids checked
        against the vocabulary), without queueing anything: for a caller that validates
        lengths first, like the HTTP server (prompt + max_tokens against max_model_len).
        Reads only the tokenizer, so any thread may call it.

        Raises:
            ValueError: token ids outside the vocabulary, a text prompt on a model without a
                tokenizer, a chat message without string role and content, or not a prompt.
            Exception: what the chat template raises (e.g. jinja2's TemplateError).
        """
        return self._tokenize(prompt)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            vocab = self.model.embed.shape[0]
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_dir} has no tokenizer; pass token ids")
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"chat message {i} needs a string 'role' and 'content', "
                                     f"got keys {sorted(m)}")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise ValueError(f"a prompt must be a string, chat messages or token ids, "
                         f"got {type(prompt).__name__}")

    def _new_request(self, prompt: Prompt, key: str | None, sp: SamplingParams,
                     index: int = 0, adapter: str | None = None,
                     sink: Callable[[StreamOutput], None] | None = None) -> Request:
        """A Request for ``prompt``, the ``index``-th of its call, for adapter name
        ``adapter`` (content ``key``), failed with the reason when the prompt is invalid;
        tracked by the engine until its output is made (handed to ``sink`` if given); not
        queued."""
        rid, self._next_id = self._next_id, self._next_id + 1
        now = time.perf_counter()
        deadline_s = sp.deadline_s or self.config.ttft_deadline_s
        r = Request(request_id=rid, prompt_token_ids=[], max_tokens=sp.max_tokens,
                    adapter_key=key, arrival_time=now,
                    deadline=None if deadline_s is None else now + deadline_s)
        seed = sp.seed
        if seed is None:
            seed = self.config.seed * 1_000_003 + rid
            if not -2**63 <= seed < 2**64:  # torch takes 64 bits; in range, unchanged
                seed %= 2**64
        generator = torch.Generator(self.pool.tensor.device).manual_seed(seed)
        self._tracked[rid] = _Tracked(request=r, index=index, prompt=prompt, adapter=adapter,
                                      params=sp, generator=generator,
                                      detokenizer=Detokenizer(self.tokenizer, sp.stop),
                                      sink=sink)
        try:
            r.prompt_token_ids = self._tokenize(prompt)
            if not r.prompt_token_ids:
                raise ValueError("the prompt is empty")
            if len(r.prompt_token_ids) >= self.max_model_len:
                raise ValueError(f"the prompt has {len(r.prompt_token_ids)} tokens; "
                                 f"max_model_len is {self.max_model_len}")
        except Exception as e:  # noqa: BLE001 - a bad prompt (a template error...) fails alone
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            r.fail(f"prompt {index}: {reason}")
        return r

    def _stop_reason(self, t: _Tracked) -> str | None:
        r, sp = t.request, t.params
        token = r.output_token_ids[-1]
        if (token in self._eos and not sp.ignore_eos) or token in sp.stop_token_ids:
            return "stop"
        if t.detokenizer.stopped_at is not None:
            return "stop"
        if len(r.output_token_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, t: _Tracked) -> RequestOutput:
        r = t.request
        n_out = len(r.output_token_ids)
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival_time
        tpot = None
        if r.first_token_time is not None and r.finished_time is not None:
            tpot = (r.finished_time - r.first_token_time) / (n_out - 1) if n_out > 1 else 0.0
        queue = None if r.first_scheduled_time is None else r.first_scheduled_time - r.arrival_time
        return RequestOutput(
            request_id=r.request_id, prompt=t.prompt, prompt_token_ids=r.prompt_token_ids,
            text=t.detokenizer.final_text, token_ids=list(r.output_token_ids),
            finish_reason=r.finish_reason, adapter=t.adapter, error=r.error, queue_time=queue,
            ttft=ttft, tpot=tpot, num_preemptions=r.num_preemptions,
            num_cached_tokens=r.num_cached_tokens)
