"""examples/offline_batch.py: the engine options of ``pagedlora serve``, same spelling, reach
the engine; bad ones are reported before the model loads."""

from __future__ import annotations

import json

import offline_batch
from support import write_random_lora

from pagedlora.cli import build_parser


def engine_flags(parser) -> set[str]:
    groups = [g for g in parser._action_groups if g.title and g.title.startswith("engine")]
    return {s for g in groups for a in g._group_actions for s in a.option_strings}


def test_engine_options_are_spelled_as_serve_spells_them(capsys):
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    try:
        offline_batch.parse_args(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    flags = engine_flags(serve) - {"--pool-gb"}  # offline_batch has its own --pool-gb
    for flag in ("--dtype", "--max-model-len", "--max-num-seqs", "--max-loras",
                 "--max-lora-rank"):
        assert flag in flags
    missing = [f for f in flags if f not in text]
    assert not missing, missing


def test_options_reach_the_engine(tiny_llama_dir, tmp_path, capsys):
    adapter = write_random_lora(tmp_path / "up", r=4, target_modules=["q_proj"], seed=1)
    requests = tmp_path / "in.jsonl"
    requests.write_text(
        json.dumps({"prompt": list(range(5, 20)), "max_tokens": 16, "temperature": 0}) + "\n"
        + json.dumps({"prompt": [7, 8, 9], "adapter": "up", "max_tokens": 3}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [str(requests), "--model", str(tiny_llama_dir), "--pool-gb", "0.02",
            "--adapter", f"up={adapter}", "-o", str(out), "--dtype", "bfloat16",
            "--max-model-len", "20", "--max-num-seqs", "1", "--max-loras", "1"]
    assert offline_batch.main(argv) == 0, capsys.readouterr().err
    first, second = [json.loads(x) for x in out.read_text().splitlines()]
    # max_model_len 20 stops the 15-token prompt after 5 tokens, offline as in vLLM's LLM
    assert first["finish_reason"] == "length" and len(first["token_ids"]) == 5
    assert second["adapter"] == "up" and len(second["token_ids"]) == 3
    # --max-lora-rank reaches the engine: the rank-4 adapter is refused
    assert offline_batch.main([*argv, "--max-lora-rank", "2"]) == 2
    assert "exceeds max_lora_rank=2" in capsys.readouterr().err


def test_bad_engine_options_are_reported_before_the_model_loads(tmp_path, capsys):
    code = offline_batch.main([str(tmp_path / "never-read.jsonl"), "--max-num-seqs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "max_num_seqs must be a positive int" in err, err
