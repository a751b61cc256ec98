"""Engine: one base model, many LoRA adapters, one unified paged pool, continuous batching."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from pagedlora.adapter_store import AdapterStore
from pagedlora.config import EngineConfig
from pagedlora.lora_adapter import LoraAdapter
from pagedlora.model import LlamaModel
from pagedlora.model_files import load_weights, resolve_model
from pagedlora.model_runner import ModelRunner
from pagedlora.outputs import RequestOutput
from pagedlora.pool import UnifiedPool
from pagedlora.sampler import sample
from pagedlora.sampling_params import SamplingParams
from pagedlora.scheduler import ADAPTER, KV, Request, Scheduler

Prompt = str | list[dict] | list[int]


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
            max_num_seqs, max_num_batched_tokens, max_model_len, max_loras, max_lora_rank, seed).

    Raises:
        TypeError: an unknown option. ValueError: an invalid option or model, or a pool too small
        for one KV block. FileNotFoundError: a missing model (the message says how to install the
        default one).
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
        self.pool = UnifiedPool(num_pages, dtype=dtype, device=device, **geometry)
        self.pool.tensor.zero_()  # padding slots are read (and masked); keep them finite
        self.adapters = AdapterStore(self.pool, num_layers=m.num_layers,
                                     module_shapes=m.module_shapes,
                                     max_lora_rank=config.max_lora_rank)
        self.scheduler = Scheduler(
            block_size=config.block_size, pages_per_block=m.num_layers,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_loras=config.max_loras,
            allocator=self.pool.allocator, adapters=self.adapters)
        self.runner = ModelRunner(m, self.pool, self.adapters)
        eos = hf_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._next_id = 0
        # request id -> (SamplingParams, its torch.Generator), until its output is made
        self._sampling: dict[int, tuple[SamplingParams, torch.Generator]] = {}
        self._peak: dict = {}  # stats() at the fullest step of the last generate call
        self._num_generated = 0  # output tokens sampled by this engine, for tokens/s

    @staticmethod
    def _load_tokenizer(model_dir: Path):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((model_dir / n).is_file() for n in names):
            return None  # token-id prompts only
        return AutoTokenizer.from_pretrained(model_dir)

    # -- adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """Registers the PEFT LoRA adapter in ``path`` under ``name``.

        Raises:
            AdapterError (a ValueError): missing files, bad config, shapes that do not fit the
                model, rank above max_lora_rank, NaN/Inf, unknown target modules.
            UnsupportedAdapterError (a NotImplementedError): DoRA, biases, modules_to_save,
                embedding/lm_head LoRA.
        """
        return self.adapters.add(name, path)

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
        prompts = self._as_list(prompts)
        names = self._per_prompt(adapters, len(prompts), "adapters")
        params = self._per_prompt(sampling_params or SamplingParams(), len(prompts),
                                  "sampling_params")
        keys = [None if n is None else self.adapters.key_of(n) for n in names]
        requests = [self._new_request(p, k, sp)
                    for p, k, sp in zip(prompts, keys, params, strict=True)]
        for r in requests:
            if not r.is_finished:
                self.scheduler.add(r)
        bar = tqdm(total=len(requests), disable=not progress, unit="req", desc="generate")
        start, generated_before = time.perf_counter(), self._num_generated
        bar.update(sum(r.is_finished for r in requests))
        self._peak = {}
        self._record_peak()
        try:
            while self.scheduler.has_unfinished():
                finished = self.step()
                self._record_peak()
                bar.update(len(finished))
                tokens = self._num_generated - generated_before
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}",
                                refresh=False)
        except BaseException:
            # Leave nothing behind: a later call must not inherit this call's requests or pages.
            for r in requests:
                if not r.is_finished:
                    self.scheduler.finish(r, "abort")
                self._sampling.pop(r.request_id, None)
            raise
        finally:
            bar.close()
        return [self._output(r, p, n) for r, p, n in zip(requests, prompts, names, strict=True)]

    def step(self) -> list[Request]:
        """Runs one scheduler step, the forward pass and sampling (``generate`` loops on it).

        Returns:
            the requests that finished in this step (stop, length, or error).
        Raises:
            RuntimeError: requests wait but none could be scheduled (a bug: ``Scheduler.add``
                fails requests that can never fit).
        """
        out = self.scheduler.schedule()
        finished = list(out.failed)
        if not out.scheduled:
            if not finished and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the pool")
            return finished
        sampled, logits = self.runner.run(out)
        self.scheduler.update(out)
        if sampled:
            states = [self._sampling[r.request_id] for r in sampled]
            tokens = sample(logits, [s[0] for s in states], [s[1] for s in states])
            self._num_generated += len(tokens)
            now = time.perf_counter()
            for r, token in zip(sampled, tokens, strict=True):
                r.output_token_ids.append(token)
                if r.first_token_time is None:
                    r.first_token_time = now
                reason = self._stop_reason(r)
                if reason is not None:
                    self.scheduler.finish(r, reason)
                    finished.append(r)
        return finished

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Pool accounting now.

        Returns:
            dict with ``pages_total``, ``pages_kv``, ``pages_adapter``, ``pages_free``,
            ``page_bytes``, ``internal_fragmentation`` (fraction of the elements in used
            pages that hold nothing), ``adapters_resident`` (names), ``requests_running``,
            ``requests_waiting``, and ``peak``: these same numbers (without ``peak``) at the
            step of the last ``generate`` call that held the most pages.
        """
        alloc, pool = self.pool.allocator, self.pool
        used_kv = sum(r.num_computed_tokens for r in self.scheduler.running)
        kv_elems = used_kv * pool.page_numel // pool.block_size * self.model.num_layers
        ad_elems = sum(self.adapters.resident(k).used_elements
                       for k in self.adapters.resident_keys)
        allocated = (alloc.num_used(KV) + alloc.num_used(ADAPTER)) * pool.page_numel
        return {
            "pages_total": alloc.num_pages,
            "pages_kv": alloc.num_used(KV),
            "pages_adapter": alloc.num_used(ADAPTER),
            "pages_free": alloc.num_free,
            "page_bytes": pool.page_numel * pool.tensor.element_size(),
            "internal_fragmentation": 1 - (kv_elems + ad_elems) / allocated if allocated else 0.0,
            "adapters_resident": sorted(n for k in self.adapters.resident_keys
                                        for n in self.adapters.names_of(k)),
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "peak": dict(self._peak),
        }

    def _record_peak(self) -> None:
        free = self.pool.allocator.num_free
        if free < self._peak.get("pages_free", self.pool.num_pages + 1):
            self._peak = {k: v for k, v in self.stats().items() if k != "peak"}

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], (dict, int)):
            return [prompts]  # one chat conversation or one token-id prompt
        return prompts

    @staticmethod
    def _per_prompt(value, n: int, what: str) -> list:
        if value is None or isinstance(value, (str, SamplingParams)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
        return value

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
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise ValueError(f"a prompt must be a string, chat messages or token ids, "
                         f"got {type(prompt).__name__}")

    def _new_request(self, prompt: Prompt, key: str | None, sp: SamplingParams) -> Request:
        rid, self._next_id = self._next_id, self._next_id + 1
        r = Request(request_id=rid, prompt_token_ids=[], max_tokens=sp.max_tokens,
                    adapter_key=key, arrival_time=time.perf_counter())
        generator = torch.Generator(self.pool.tensor.device).manual_seed(
            sp.seed if sp.seed is not None else self.config.seed * 1_000_003 + rid)
        self._sampling[rid] = (sp, generator)
        try:
            r.prompt_token_ids = self._tokenize(prompt)
            if not r.prompt_token_ids:
                raise ValueError("the prompt is empty")
            if len(r.prompt_token_ids) >= self.max_model_len:
                raise ValueError(f"the prompt has {len(r.prompt_token_ids)} tokens; "
                                 f"max_model_len is {self.max_model_len}")
        except ValueError as e:
            r.fail(f"request {rid}: {e}")
        return r

    def _stop_reason(self, r: Request) -> str | None:
        sp = self._sampling[r.request_id][0]
        token = r.output_token_ids[-1]
        if (token in self._eos and not sp.ignore_eos) or token in sp.stop_token_ids:
            return "stop"
        if sp.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
            if any(s in text for s in sp.stop):
                return "stop"
        if len(r.output_token_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, r: Request, prompt: Prompt, name: str | None) -> RequestOutput:
        sp = self._sampling.pop(r.request_id)[0]
        text = ""
        if self.tokenizer is not None and r.output_token_ids:
            text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
            cuts = [text.find(s) for s in sp.stop if s in text]
            if cuts:
                text = text[:min(cuts)]
        n_out = len(r.output_token_ids)
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival_time
        tpot = None
        if r.first_token_time is not None and r.finished_time is not None:
            tpot = (r.finished_time - r.first_token_time) / (n_out - 1) if n_out > 1 else 0.0
        queue = None if r.first_scheduled_time is None else r.first_scheduled_time - r.arrival_time
        return RequestOutput(
            request_id=r.request_id, prompt=prompt, prompt_token_ids=r.prompt_token_ids,
            text=text, token_ids=list(r.output_token_ids), finish_reason=r.finish_reason,
            adapter=name, error=r.error, queue_time=queue, ttft=ttft, tpot=tpot,
            num_preemptions=r.num_preemptions)
