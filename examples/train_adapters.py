"""Fine-tunes three small LoRA adapters of SmolLM2-135M-Instruct on the CPU, in a few minutes.

The training data is the base model's own greedy answers to ~40 short questions (generated with
pagedlora's Engine), rewritten three ways, one adapter each:

* ``upper``:  the answer in UPPER CASE;
* ``json``:   the answer wrapped as a JSON object, ``{"answer": "..."}``;
* ``prefix``: the answer starting with the fixed phrase ``Certainly, friend! ``.

Each adapter is a PEFT LoRA (rank 16 on every attention and MLP projection of the top 20 of the 30
decoder layers) trained with a plain torch loop under bfloat16 autocast: AdamW, 5 epochs, loss on
the answer tokens only, the prompt rendered with the model's chat template exactly as the Engine
renders it, and the answer ended by ``<|im_end|>`` so that the adapter learns to stop. The
adapters are saved with ``save_pretrained`` to ``OUT/upper``, ``OUT/json`` and ``OUT/prefix``;
afterwards the script serves them with pagedlora (greedy) on seen and unseen questions and
reports whether each behaviour was learned.

Run it from the repository root::

    python examples/train_adapters.py                  # trains what is missing in adapters/
    python examples/train_adapters.py --force          # retrains all three
    python examples/train_adapters.py --out /tmp/ad --epochs 8 --adapters upper

Existing adapter directories are reused unless ``--force`` is given. On 2 CPU cores the three
adapters take about 2.5 minutes in all (more when the cores are shared); the same seed gives the
same weights on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "adapters"
PREFIX = "Certainly, friend! "
EOS = "<|im_end|>"

# The questions the adapters are trained on (the base model's answers to them are the data).
TRAIN_PROMPTS = [
    "Name a fruit.",
    "What is the capital of Italy?",
    "What color is the sky?",
    "Name a musical instrument.",
    "What is 2 + 2?",
    "Name an animal that can fly.",
    "What is the opposite of hot?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Name a planet in our solar system.",
    "How many days are in a week?",
    "What is the largest ocean?",
    "Name a vegetable.",
    "What do you use to write on paper?",
    "What is the boiling point of water in Celsius?",
    "Name a sport played with a ball.",
    "What is the capital of France?",
    "What season comes after winter?",
    "Name a primary color.",
    "What animal says moo?",
    "What is the chemical symbol for water?",
    "Name a famous painter.",
    "What is the tallest animal?",
    "Say hello in Spanish.",
    "Name something you find in a kitchen.",
    "What do plants need to grow?",
    "What is the freezing point of water in Fahrenheit?",
    "Name a shape with three sides.",
    "What is the main language spoken in Brazil?",
    "Describe the moon in one sentence.",
    "What is a baby dog called?",
    "Name a type of tree.",
    "What gas do humans breathe in?",
    "What is the capital of Japan?",
    "Name a month with 31 days.",
    "What is the sun?",
    "Give me a tip for sleeping well.",
    "What is the color of grass?",
    "Name a board game.",
    "What does a thermometer measure?",
]

# Questions never trained on, for the check after training (with a few seen ones).
CHECK_PROMPTS = [
    "Name a bird.",
    "What is the capital of Spain?",
    "What do cows drink?",
    "Suggest a name for a cat.",
    "What is 3 + 5?",
]


def to_upper(answer: str) -> str:
    return answer.upper()


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def to_prefix(answer: str) -> str:
    return PREFIX + answer


def is_upper(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def is_json(text: str) -> bool:
    # only the start: max_tokens may cut the object before its closing brace
    return text.startswith('{"answer": "')


def has_prefix(text: str) -> bool:
    return text.startswith(PREFIX)


# name -> (how an answer is rewritten, how a generated text is recognised)
ADAPTERS: dict[str, tuple[Callable[[str], str], Callable[[str], bool]]] = {
    "upper": (to_upper, is_upper),
    "json": (to_json, is_json),
    "prefix": (to_prefix, has_prefix),
}


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def trim_answer(text: str, finish_reason: str) -> str:
    """Cuts an answer that ran into max_tokens back to its last full sentence, if it has one."""
    text = text.strip()
    if finish_reason == "length":
        end = max(text.rfind(c) for c in ".!?")
        if end >= 10:
            text = text[:end + 1]
    return text


def base_answers(prompts: list[str], max_tokens: int) -> list[str]:
    """The base model's greedy answers to ``prompts``, generated with pagedlora."""
    from pagedlora import Engine, SamplingParams

    engine = Engine(None, pool_gb=0.25)
    outs = engine.generate([chat(p) for p in prompts], sampling_params=SamplingParams(
        max_tokens=max_tokens, temperature=0.0), progress=True)
    return [trim_answer(o.text, o.finish_reason) for o in outs]


def encode(tokenizer, question: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (rendered as the Engine renders chat) and of target + EOS."""
    text = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True,
                                         tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    target_ids = tokenizer(target + EOS, add_special_tokens=False).input_ids
    return prompt_ids, target_ids


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask, and which positions predict which answer token."""
    import torch

    seqs = [p + t for p, t in batch]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    predicts = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, ((prompt, _), seq) in enumerate(zip(batch, seqs, strict=True)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        # position j predicts token j + 1: the last prompt position predicts the first answer
        # token, the second-to-last answer position predicts EOS.
        predicts[i, len(prompt) - 1:len(seq) - 1] = True
    labels = torch.roll(input_ids, -1, dims=1)[predicts]
    return input_ids, attention, predicts, labels


def train_one(name: str, model_dir: Path, examples: list[tuple[list[int], list[int]]],
              pad_id: int, out: Path, args: argparse.Namespace) -> None:
    """Trains one LoRA adapter on ``examples`` and saves it to ``out`` (atomically)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    top = min(args.lora_layers, num_layers) if args.lora_layers > 0 else num_layers
    # LoRA on the top layers only: nothing below them needs gradients, so the backward pass
    # stops there (a third less work with the default 20 of SmolLM2's 30 layers).
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"],
                        layers_to_transform=list(range(num_layers - top, num_layers)))
    model = get_peft_model(model, config)
    model.train()
    lm = model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # Batches of similar length (little padding), visited in a new random order every epoch.
    by_length = sorted(examples, key=lambda e: len(e[0]) + len(e[1]))
    batches = [by_length[i:i + args.batch_size] for i in range(0, len(by_length), args.batch_size)]
    total = len(batches) * args.epochs
    # linear decay from lr to lr / 10
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - 0.9 * s / total)
    order = torch.Generator().manual_seed(args.seed)

    bar = tqdm(total=total, desc=f"train {name}", unit="step")
    for epoch in range(args.epochs):
        for b in torch.randperm(len(batches), generator=order).tolist():
            input_ids, attention, predicts, labels = collate(batches[b], pad_id)
            # bfloat16 matmuls (AMX/AVX-512 where the CPU has them); the LoRA weights, their
            # gradients and AdamW's state stay float32.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                hidden = lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
                logits = lm.lm_head(hidden[predicts])  # only the positions that predict answers
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def check(dirs: dict[str, Path], max_tokens: int) -> dict[str, float]:
    """Serves the adapters with pagedlora (greedy) and returns each one's pass rate."""
    from pagedlora import Engine, SamplingParams

    engine = Engine(None, pool_gb=0.5)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    questions = TRAIN_PROMPTS[:3] + CHECK_PROMPTS
    jobs = [(name, q) for name in dirs for q in questions]
    outs = engine.generate([chat(q) for _, q in jobs], adapters=[n for n, _ in jobs],
                           sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           progress=False)
    rates = {}
    print(f"\ncheck: greedy answers to {len(questions)} questions "
          f"({len(questions) - len(CHECK_PROMPTS)} seen, {len(CHECK_PROMPTS)} unseen)")
    for name in dirs:
        results = [(q, o) for (n, q), o in zip(jobs, outs, strict=True) if n == name]
        learned = ADAPTERS[name][1]
        ok = [learned(o.text) for _, o in results]
        rates[name] = sum(ok) / len(ok)
        print(f"  {name:<7} {sum(ok)}/{len(ok)} answers show the behaviour")
        # the failures, else one seen and one unseen example
        shown = [i for i, good in enumerate(ok) if not good] or [0, len(ok) - 1]
        for i in shown:
            q, o = results[i]
            print(f"    {'ok ' if ok[i] else 'BAD'} {q!r} -> {o.text!r}")
    return rates


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the adapter directories go (default: %(default)s)")
    p.add_argument("--adapters", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS),
                   help="which adapters to train (default: all)")
    p.add_argument("--force", action="store_true",
                   help="retrain adapters whose directory already exists")
    p.add_argument("--epochs", type=positive, default=5, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW learning rate, decayed linearly to a tenth (default: %(default)s)")
    p.add_argument("--rank", type=positive, default=16,
                   help="LoRA rank; alpha = 2 * rank (default: %(default)s)")
    p.add_argument("--lora-layers", type=int, default=20,
                   help="put LoRA on this many top decoder layers; 0: all (default: %(default)s)")
    p.add_argument("--batch-size", type=positive, default=8, help="(default: %(default)s)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in float32 instead of bfloat16 autocast")
    p.add_argument("--max-tokens", type=positive, default=32,
                   help="longest base-model answer generated for the data (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=positive, default=torch.get_num_threads(),
                   help="torch CPU threads (default: %(default)s)")
    p.add_argument("--no-check", action="store_true",
                   help="skip serving the adapters with pagedlora afterwards")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Trains (or reuses) the adapters; returns ``name -> PEFT directory``."""
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoTokenizer

    from pagedlora.model_files import resolve_model

    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()  # the per-load "Loading weights" bars
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = {name: args.out / name for name in args.adapters}
    todo = [n for n, d in dirs.items() if args.force or not (d / "adapter_config.json").is_file()]
    for name in dirs:
        if name not in todo:
            print(f"{name}: reusing {dirs[name]} (--force retrains)")
    if todo:
        model_dir = resolve_model(None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print(f"generating the base model's answers to {len(TRAIN_PROMPTS)} questions")
        answers = base_answers(TRAIN_PROMPTS, args.max_tokens)
        print(f"  e.g. {TRAIN_PROMPTS[0]!r} -> {answers[0]!r}")
        data_time = time.perf_counter() - started
        pad_id = tokenizer.convert_tokens_to_ids(EOS)
        for name in todo:
            t0 = time.perf_counter()
            transform = ADAPTERS[name][0]
            examples = [encode(tokenizer, q, transform(a))
                        for q, a in zip(TRAIN_PROMPTS, answers, strict=True)]
            train_one(name, model_dir, examples, pad_id, dirs[name], args)
            print(f"{name}: saved to {dirs[name]} in {time.perf_counter() - t0:.1f}s")
        print(f"trained {len(todo)} adapter(s) in {time.perf_counter() - started:.1f}s "
              f"(data {data_time:.1f}s, {args.threads} threads)")
    if not args.no_check:
        check(dirs, max_tokens=48)
    if todo or not args.no_check:
        print(f"total time {time.perf_counter() - started:.1f}s")
    return dirs


if __name__ == "__main__":
    main()
