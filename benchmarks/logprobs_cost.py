"""What log-probabilities cost: the same batch of greedy requests on one engine, nobody asking,
one request in 16 asking, every request asking ``logprobs=5``, and every request asking
``prompt_logprobs=5`` too, run round-robin ``--repeat`` times in one process; prints each
variant's best wall time and its ratio to nobody asking.

    python benchmarks/logprobs_cost.py --repeat 2
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pagedlora import Engine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(args.model, pool_gb=1.0, enable_prefix_caching=False)
    rng = random.Random(0)
    vocab = engine.model.embed.shape[0]
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]
               for _ in range(args.requests)]

    def params(logprobs=None, prompt_logprobs=None) -> SamplingParams:
        return SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    variants = {
        "none": [params()] * args.requests,
        "one in 16, logprobs=5": [params(5) if i % 16 == 0 else params()
                                  for i in range(args.requests)],
        "all, logprobs=5": [params(5)] * args.requests,
        "all, logprobs=5 + prompt_logprobs=5": [params(5, 5)] * args.requests,
    }
    engine.generate(prompts[:2], sampling_params=params(), progress=False)  # warm up
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, sp in variants.items():
            start = time.perf_counter()
            engine.generate(prompts, sampling_params=sp, progress=False)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:40s} {seconds:7.2f} s  x{seconds / best['none']:.3f}")


if __name__ == "__main__":
    main()
