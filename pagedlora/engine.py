"""Engine: one base model, many LoRA adapters, one unified paged pool, continuous batching."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm
from transformers import AutoConfig

from pagedlora.adapter_dirs import adapter_dirs, fetch_adapter
from pagedlora.config import EngineConfig
from pagedlora.engine_core import EngineCore
from pagedlora.input_processor import (
    Adapter,
    InputProcessor,
    Prompt,
    as_prompt_list,
    per_prompt,
)
from pagedlora.lora_adapter import LoraAdapter
from pagedlora.model_files import eos_token_ids, load_tokenizer, resolve_model
from pagedlora.output_processor import OutputProcessor, Sink
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.sampler import Sampler
from pagedlora.sampling_params import SamplingParams
from pagedlora.scheduler import Request
from pagedlora.step_turn import StepTurn

__all__ = ["Adapter", "Engine", "Prompt"]


class Engine:
    """Serves a base LLM and many unmerged LoRA adapters from one unified paged pool.

    Example::

        with Engine(model=None, pool_gb=1.0) as engine:        # None: SmolLM2-135M-Instruct
            engine.add_adapter("upper", "adapters/upper")       # a PEFT directory
            outs = engine.generate(["Name a color.", "What is 2+2?"], adapters=["upper", None],
                                   sampling_params=SamplingParams(max_tokens=64, temperature=0))

    A facade: an :class:`InputProcessor` makes Requests, the :class:`EngineCore` steps them
    (scheduler, adapter store, model runner), an :class:`OutputProcessor` makes and routes the
    outputs. ``generate``, ``stream``, ``add_request``, ``step`` and ``abort`` may be called from
    several threads at once: requests join one running batch, one thread steps at a time, and
    each call gets exactly its own outputs.

    With ``tensor_parallel_size=N`` the model runs split over N worker processes (see
    :class:`EngineConfig`); this object is then the driver, and ``model`` is None. A worker
    that dies or hangs ends every unfinished request with "error" naming its rank; later
    calls raise :class:`~pagedlora.errors.EngineDeadError`. :meth:`close` (or ``with``)
    stops the workers.

    Args:
        model: an HF directory (config.json + *.safetensors), a ``.gguf`` file (dequantized
            once and cached under ``$PAGEDLORA_CACHE``), or None for the embedded default.
        pool_gb: size of the unified pool in GiB (per device, under tensor parallelism).
        sampler: chooses the tokens from the logits (default :class:`Sampler`; tests inject
            their own). Under tensor parallelism a sampler given here runs in this process on
            the logits rank 0 sends (the default one runs in rank 0).
        **options: the other fields of :class:`EngineConfig`.

    Raises:
        TypeError: an unknown option. ValueError: an invalid option or model, a model that
        cannot be split over ``tensor_parallel_size`` devices, or a pool too small for one KV
        block (next to the adapter slots, with ``memory_layout="static"``).
        FileNotFoundError: a missing model (the message says how to install the default one).
        RuntimeError: a tensor-parallel worker that cannot start (naming its rank).
    """

    def __init__(self, model: str | os.PathLike | None = None, pool_gb: float = 1.0, *,
                 sampler: Sampler | None = None, **options) -> None:
        self.config = config = EngineConfig.from_options(pool_gb, **options)
        self.model_dir = resolve_model(model)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        self.core = EngineCore.build(config, self.model_dir, hf_config,
                                     max_model_len=self.max_model_len, sampler=sampler)
        self.model, self.pool, self.adapters = self.core.model, self.core.pool, self.core.adapters
        scheduler = self.core.scheduler
        self.processor = InputProcessor(
            self.tokenizer, vocab_size=self.core.runner.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids(hf_config, self.tokenizer), seed=config.seed,
            ttft_deadline_s=config.ttft_deadline_s, key_of=self.adapters.key_of,
            is_dora=self.adapters.is_dora, rejection=scheduler.rejection, clock=scheduler.clock,
            max_logprobs=config.max_logprobs)
        self.outputs = OutputProcessor(self.tokenizer)
        self._for_step: deque[StreamOutput] = deque()  # add_request's outputs, for step()
        self._turn = StepTurn()  # one thread steps at a time

    # -- adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike, preload: bool = False
                    ) -> LoraAdapter:
        """Registers the PEFT LoRA adapter in ``path`` under ``name`` (see
        :meth:`AdapterStore.add`: weights read once to validate and hash them, then dropped
        unless ``preload``). ``path`` is a PEFT directory, a tar archive of one, an ``s3://``
        URL of either (downloaded once into the cache, size- and MD5-checked), or an
        ``org/name`` id in the local Hugging Face cache
        (:func:`pagedlora.adapter_dirs.fetch_adapter`). Thread-safe. Re-adding a name with
        other weights makes a new adapter; requests already queued keep the old one.

        Raises:
            AdapterError (a ValueError): a source that cannot be had (naming its URL), missing
                files, bad config, shapes that do not fit the model, rank above max_lora_rank,
                NaN/Inf, unknown dtype or target modules, saved base embedding weights that
                are not the model's (see :func:`pagedlora.lora_adapter.read_lora_adapter`).
            UnsupportedAdapterError (a NotImplementedError): biases, modules_to_save, DoRA on
                embed_tokens/lm_head, and the PEFT options that change the forward pass.
        """
        return self.adapters.add(name, fetch_adapter(path), preload=preload)

    def add_adapters_from_dir(self, root: str | os.PathLike, preload: bool = False
                              ) -> list[LoraAdapter]:
        """Registers every ``root/<name>/`` PEFT directory under its folder's name (SageMaker
        LMI's ``adapters/`` layout); ``root`` may be a ``.tar.gz`` of it or an ``s3://`` URL
        of either. All or nothing.

        Raises:
            AdapterError, UnsupportedAdapterError: as :meth:`add_adapter`, naming the adapter;
                also no adapter found, an unreadable archive or one with unsafe paths.
        """
        return self.adapters.add_many(adapter_dirs(root).items(), preload=preload)

    def remove_adapter(self, name: str) -> None:
        """Unregisters ``name``; its pages, host copy and spill file are freed unless another
        name has the same content. Thread-safe.

        Raises:
            UnknownAdapterError (a ValueError): no adapter of that name. ValueError: requests
                for it are waiting or running (and no other name shares its content).
        """
        self.adapters.remove(name)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 adapters: Adapter | Sequence[Adapter] = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = True) -> list[RequestOutput]:
        """Generates for every prompt, batching them continuously; results in prompt order.

        Args:
            prompts: one prompt or a list; a prompt is a string, a list of chat messages
                (``{"role", "content"}`` dicts, rendered with the model's chat template), or a
                list of token ids.
            adapters: one adapter per prompt, or one for all: a name, an
                :class:`~pagedlora.AdapterMix` (a scaled adapter or a weighted combination
                of adapters, batched with the rest), or None (the base model).
            sampling_params: one for all, one per prompt, or None (defaults).
            progress: show a tqdm bar of finished requests and output tokens/s (False: none).
        Returns:
            one RequestOutput per prompt. An invalid prompt (see :class:`InputProcessor`) gets
            finish_reason "error" and a message; the others run normally. If generate itself
            is interrupted (an exception, Ctrl-C), its requests are aborted and their pages
            freed before the exception propagates.
        Raises:
            UnknownAdapterError (a ValueError): an adapter name never added, alone or in a mix
                (before any work).
            AdapterMixError (a ValueError): a DoRA adapter scaled or mixed (before any work).
            ValueError, TypeError: lists whose lengths or types do not fit the prompts.
        """
        inbox: deque[StreamOutput] = deque()
        ids = self._submit(prompts, adapters, sampling_params, inbox.append)
        done: dict[int, RequestOutput] = {}
        bar = tqdm(total=len(ids), disable=not progress, unit="req", desc="generate")
        start, tokens = time.perf_counter(), 0
        with self._turn.held():
            self.core.reset_peak()
        try:
            for d in self._drive(inbox, len(ids)):
                tokens += len(d.new_token_ids)
                if d.finished:
                    done[d.request_id] = d.output
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}",
                                    refresh=False)
        except BaseException:  # leave nothing behind for a later call
            self._abort_now(ids, wait=True)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               adapters: Adapter | Sequence[Adapter] = None,
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamOutput]:
        """Like :meth:`generate`, but yields each request's new tokens and text as the steps
        produce them; a request's last StreamOutput has ``finished=True`` and its complete
        RequestOutput. Closing the iterator early (``close()``, ``break``, garbage collection)
        aborts the requests still running and frees their pages.

        Args and errors: as for :meth:`generate` (no progress bar).
        """
        inbox: deque[StreamOutput] = deque()
        ids = self._submit(prompts, adapters, sampling_params, inbox.append)
        try:
            yield from self._drive(inbox, len(ids))
        finally:  # also when garbage-collected, in whatever thread and state that happens
            self._abort_now(ids, wait=False)

    def add_request(self, prompt: Prompt, adapter: Adapter = None,
                    sampling_params: SamplingParams | None = None,
                    on_output: Sink | None = None) -> int:
        """Queues one request and returns its id at once, without stepping (vLLM's
        ``LLMEngine.add_request``), for callers that drive :meth:`step` themselves. Later
        ``step()`` calls return its StreamOutputs (an invalid prompt's one "error" output by
        the next); with ``on_output``, each also goes to the callback as it is made, in the
        stepping thread (it must not raise). Its arrival time, for TTFT, is now.

        Raises:
            UnknownAdapterError (a ValueError): an adapter name never added.
            AdapterMixError (a ValueError): a DoRA adapter scaled or mixed.
        """
        sink = self._for_step.append if on_output is None else (
            lambda d: (on_output(d), self._for_step.append(d)))
        return self._submit([prompt], [adapter], [sampling_params or SamplingParams()], sink)[0]

    def add_requests(self, prompts: Sequence[Prompt], adapters: Sequence[Adapter],
                     sampling_params: Sequence[SamplingParams], on_output: Sink) -> list[int]:
        """Queues several requests, all or none, their StreamOutputs (``index`` = position
        here) going to ``on_output`` only, in the stepping thread (the HTTP server's engine
        loop). Nothing is queued when one fails.

        Raises:
            UnknownAdapterError: an adapter name never added.
            AdapterMixError: a DoRA adapter scaled or mixed.
            InvalidPromptError: the first invalid prompt (see :class:`InputProcessor`).
        """
        return self._submit(prompts, adapters, sampling_params, on_output, all_or_none=True)

    def enqueue(self, request: Request, *, prompt: Prompt, adapter: Adapter,
                index: int = 0, sink: Sink | None = None) -> int:
        """Queues a Request made by ``engine.processor.process`` (validation and queueing
        apart, as vLLM's input processor and engine core are); its StreamOutputs go to
        ``sink``, or, when None, to ``step()``'s return. ``prompt``, ``adapter`` (the name or
        mix) and ``index`` are reported in its outputs.

        Returns:
            its request id.
        Raises:
            EngineDeadError: the engine cannot run any more.
        """
        self.core.check_alive()
        self.outputs.add(request, index=index, prompt=prompt, adapter=adapter,
                         stop=request.sampling.params.stop,
                         sink=self._for_step.append if sink is None else sink)
        self.core.add_request(request)
        return request.request_id

    def step(self) -> list[StreamOutput]:
        """Runs one step (after another thread's, if one is stepping) and returns the
        StreamOutputs of :meth:`add_request`'s requests that no ``step()`` has returned yet,
        whichever call's step made them.

        Raises:
            RuntimeError: requests wait but none could be scheduled (a bug).
        """
        with self._turn.held():
            self._step()
        return [self._for_step.popleft() for _ in range(len(self._for_step))]

    def abort(self, request_id: int) -> bool:
        """Asks for a request to finish with "abort"; its pages are freed at the next step.
        Safe to call from any thread.

        Returns:
            False when no such request is running or waiting (unknown or already finished).
        """
        if not self.outputs.is_live(request_id):
            return False
        self.core.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is queued, waiting or running, or an output of a rejected
        prompt waits for the next ``step()``."""
        return self.core.has_unfinished() or self.outputs.has_pending()

    # -- stats and lifecycle -----------------------------------------------------------------

    def stats(self, history: bool = False) -> dict:
        """Pool accounting and scheduling metrics between two steps (safe from any thread):
        :meth:`EngineCore.summary` (pages by kind, fragmentation, requests, prefix cache,
        adapters, the last step, the peak of the last ``generate`` call); ``steps`` holds the
        last step only, or with ``history=True`` the last 1,024, oldest first."""
        with self._turn.held():
            return self.core.summary(history)

    def close(self) -> None:
        """Stops the adapter prefetcher, removes a private spill directory and stops the
        tensor-parallel workers, if any, after a step in progress in another thread.
        Idempotent."""
        with self._turn.held():
            self.core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _submit(self, prompts, adapters, sampling_params, sink: Sink, *,
                all_or_none: bool = False) -> list[int]:
        """Validates and queues the prompts (see :meth:`generate`); their outputs go to
        ``sink``. An invalid prompt raises when ``all_or_none``, else fails alone; a dead
        engine raises EngineDeadError."""
        self.core.check_alive()
        prompts = as_prompt_list(prompts)
        names = per_prompt(adapters, len(prompts), "adapters")
        params = per_prompt(sampling_params or SamplingParams(), len(prompts),
                            "sampling_params")
        made = self.processor.process_all(prompts, names, params, all_or_none=all_or_none)
        for i, (rid, request, error) in enumerate(made):
            if request is None:
                self.outputs.reject(rid, index=i, prompt=prompts[i], adapter=names[i],
                                    error=error, sink=sink)
            else:
                self.enqueue(request, prompt=prompts[i], adapter=names[i], index=i, sink=sink)
        return [rid for rid, _, _ in made]

    def _drive(self, inbox: deque[StreamOutput], n: int) -> Iterator[StreamOutput]:
        """Yields ``n`` requests' StreamOutputs from ``inbox`` until all have finished,
        stepping the engine when the inbox is empty and no other thread steps."""
        if self._turn.mine:
            raise RuntimeError("generate/stream cannot run inside a step (from an output "
                               "callback): queue with add_request instead")
        remaining = n
        while remaining:
            if inbox:
                d = inbox.popleft()
                remaining -= d.finished
                yield d
                continue
            if self._turn.take_or_wait(lambda: bool(inbox)):
                try:
                    self._step()
                finally:
                    self._turn.release()

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids the engine would run for ``prompt`` (a string as is, chat messages
        through the model's chat template with the generation prompt, token ids checked
        against the vocabulary), without queueing anything: for a caller that validates
        lengths first, like the HTTP server (prompt + max_tokens against max_model_len).
        Reads only the tokenizer, so any thread may call it.

        Raises:
            InvalidPromptError (a ValueError): token ids outside the vocabulary, a text prompt
                on a model without a tokenizer, a chat message without string role and
                content, or not a prompt.
            Exception: what the chat template raises (e.g. jinja2's TemplateError).
        """
        return self.processor.tokenize(prompt)

    def _step(self) -> list[StreamOutput]:
        """One step in the thread holding the turn; routes its outputs to their sinks."""
        return self.outputs.process(self.core.step().requests, self.core.finish)

    def _abort_now(self, ids: list[int], wait: bool) -> None:
        """Forgets the unfinished ones of ``ids`` and finishes them with "abort", freeing
        their pages: now if this thread can have the turn (``wait``: waiting for a step in
        another thread to end), else at the next step. Never while this thread is inside a
        step (a stream finalized by the garbage collector there, or from an output callback),
        and without waiting unless ``wait``, since a finalizer may run while its thread holds
        a lock the stepping thread needs."""
        live = {rid for rid in ids if self.outputs.is_live(rid)}
        if not live:
            return
        self.outputs.drop(live)
        if not self._turn.mine and (self._turn.try_take() or (wait and self._turn.take())):
            try:
                self.core.abort_now(live)
            finally:
                self._turn.release()
            return
        for rid in live:
            self.core.abort(rid)

