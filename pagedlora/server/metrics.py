"""ServerMetrics: the server's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedlora.outputs import RequestOutput

# seconds; vLLM's buckets, so dashboards built for it read these the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
POOL_KINDS = ("kv", "kv_cached", "adapter", "free")
TIERS = ("pool", "host", "disk", "source")


class ServerMetrics:
    """Counters, histograms and gauges of one server app, in a registry of their own (never
    prometheus_client's global one, so several apps can live in one process).

    Labels: ``model`` is the base model's served name; ``adapter`` the adapter's name, empty
    for the base model; for an ``AdapterMix`` its names joined by "+" in the order given,
    without the weights (which would make a series per weight).
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        per_adapter = ["model", "adapter"]
        self.requests = Counter("pagedlora_requests", "Finished requests (finish_reason: stop, "
                                "length, abort, error).", [*per_adapter, "finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("pagedlora_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", per_adapter, registry=r)
        self.generation_tokens = Counter("pagedlora_generation_tokens", "Output tokens of "
                                         "finished requests.", per_adapter, registry=r)
        self.ttft = Histogram("pagedlora_time_to_first_token_seconds", "Time to first token "
                              "(TTFT), from arrival in the engine.", per_adapter,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pagedlora_time_per_output_token_seconds", "Time per output "
                              "token after the first (TPOT), per request.", per_adapter,
                              buckets=TPOT_BUCKETS, registry=r)
        self.http_errors = Counter("pagedlora_http_errors", "HTTP error responses by route "
                                   "and status.", ["endpoint", "status"], registry=r)
        self.pool_pages = Gauge("pagedlora_pool_pages", "Unified pool pages by kind: kv (held "
                                "by requests), kv_cached (prefix cache, unheld), adapter, "
                                "free.", ["model", "kind"], registry=r)
        self.adapters = Gauge("pagedlora_adapters", "Registered adapters by their fastest "
                              "tier (pool, host, disk, source).", ["model", "tier"], registry=r)
        self.queue_length = Gauge("pagedlora_queue_length", "Requests accepted that have not "
                                  "produced their first token.", ["model"], registry=r)
        self.running = Gauge("pagedlora_requests_running", "Requests in the running batch.",
                             ["model"], registry=r)
        self.vllm = VllmGauges(r)

    def observe_finished(self, model: str, out: RequestOutput) -> None:
        """Counts a finished request (thread-safe; the engine loops call it)."""
        adapter = out.adapter or ""
        if not isinstance(adapter, str):  # an AdapterMix
            adapter = "+".join(adapter.names)
        self.requests.labels(model, adapter, out.finish_reason).inc()
        self.prompt_tokens.labels(model, adapter).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(model, adapter).inc(len(out.token_ids))
        if out.ttft is not None:
            self.ttft.labels(model, adapter).observe(out.ttft)
        if out.tpot is not None and len(out.token_ids) > 1:
            self.tpot.labels(model, adapter).observe(out.tpot)

    def observe_error(self, endpoint: str, status: int) -> None:
        """Counts an HTTP error response."""
        self.http_errors.labels(endpoint, str(status)).inc()

    def observe_engine(self, model: str, stats: dict, queue_length: int, max_loras: int
                       ) -> None:
        """Sets the gauges from ``Engine.stats()``, the loop's queue length and the engine's
        ``max_loras``."""
        held_kv = stats["pages_kv"] - stats["pages_kv_cached"]
        pages = dict(zip(POOL_KINDS, (held_kv, stats["pages_kv_cached"],
                                      stats["pages_adapter"], stats["pages_free"]),
                         strict=True))
        for kind, n in pages.items():
            self.pool_pages.labels(model, kind).set(n)
        tiers = [a["tier"] for a in stats["adapters"].values()]
        for tier in TIERS:
            self.adapters.labels(model, tier).set(tiers.count(tier))
        self.queue_length.labels(model).set(queue_length)
        self.running.labels(model).set(stats["requests_running"])
        self.vllm.observe(model, stats, max_loras)

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)


class VllmGauges:
    """The series Kubernetes' inference gateways read, with vLLM's names and labels (the
    Gateway API inference extension's model server protocol; llm-d's and KServe's schedulers
    use it), so that their LoRA-affinity and load-aware scorers route to pagedlora as to vLLM.

    - ``vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``:
      the adapters of the running and of the waiting requests (names, sorted, joined by
      commas), ``max_lora`` = ``max_loras`` (distinct adapters a step can run); the value is
      the time of the reading in seconds since the epoch, as vLLM's (readers take the series
      with the largest value). Only the latest label set is kept (vLLM keeps every past one).
    - ``vllm:num_requests_running``, ``vllm:num_requests_waiting``: requests in the running
      batch, and queued (new or preempted), in the engine's scheduler.
    - ``vllm:kv_cache_usage_perc`` and its older name ``vllm:gpu_cache_usage_perc``: the
      fraction (0..1, despite the name) of the unified pool's pages a new request cannot
      have (``EngineStats.kv_cache_usage``: KV blocks held by requests and pinned adapters).

    Every series has vLLM's ``model_name`` label: the base model's served name.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests: "
                               "the adapters of the running and waiting requests.",
                               ["model_name", "max_lora", "running_lora_adapters",
                                "waiting_lora_adapters"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model "
                             "execution batches.", ["model_name"], registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                             "processed.", ["model_name"], registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 "
                              "percent usage (pagedlora: unified pool pages not available "
                              "to a new request).", ["model_name"], registry=r)
        self.gpu_usage = Gauge("vllm:gpu_cache_usage_perc", "The older name of "
                               "vllm:kv_cache_usage_perc.", ["model_name"], registry=r)
        self._lora_labels: dict[str, tuple[str, ...]] = {}  # model -> its current label set

    def observe(self, model: str, stats: dict, max_loras: int) -> None:
        """Sets every series of ``model`` from ``Engine.stats()`` (``running_adapters``,
        ``waiting_adapters``, ``requests_running``, ``requests_waiting``,
        ``kv_cache_usage``)."""
        labels = (model, str(max_loras), ",".join(sorted(stats["running_adapters"])),
                  ",".join(sorted(stats["waiting_adapters"])))
        old = self._lora_labels.get(model)
        if old is not None and old != labels:
            self.lora_info.remove(*old)
        self._lora_labels[model] = labels
        self.lora_info.labels(*labels).set_to_current_time()
        self.running.labels(model).set(stats["requests_running"])
        self.waiting.labels(model).set(stats["requests_waiting"])
        for gauge in (self.kv_usage, self.gpu_usage):
            gauge.labels(model).set(stats["kv_cache_usage"])
