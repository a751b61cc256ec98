"""The article's SageMaker LMI deployment, end to end, against a real S3 API on the loopback
(moto's server): adapters packed as ``adapters.tar.gz``, models from S3 and from the local
Hugging Face cache, a server configured by an environment shaped like the article's
``env_generation``, the article's requests, a second base model chosen by the inference
component header, LMI's adapter management API, restart persistence; then LMI configuration
precedence, refusals and warnings, and bad sources, in process."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import tarfile
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file
from support import ServerProcess, save_random_adapter, save_random_llama

from pagedlora import AdapterError, Engine, SamplingParams
from pagedlora.cli import build_parser, main, server_config
from pagedlora.errors import SourceError
from pagedlora.s3 import S3Options, check_download
from pagedlora.server.lmi_deployment import LmiConfigError, weight_bytes
from pagedlora.server.lmi_options import map_settings, read_properties, settings
from pagedlora.sources import fetch

BUCKET = "lmi-artifacts"
HF_ID = "test-org/tiny-llama-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
# The article's env_generation, with its two-GPU tensor_parallel_degree as "max" (one device
# here, so one rank; a degree of 2 is tensor_parallel_size=2, see below).
ENV_GENERATION = {"OPTION_MODEL_ID": HF_ID, "OPTION_TRUST_REMOTE_CODE": "true",
                  "OPTION_TENSOR_PARALLEL_DEGREE": "max", "OPTION_ROLLING_BATCH": "lmi-dist",
                  "OPTION_MAX_ROLLING_BATCH_SIZE": "32", "OPTION_DTYPE": "fp16",
                  "OPTION_ENABLE_LORA": "true", "OPTION_GPU_MEMORY_UTILIZATION": "0.8",
                  "OPTION_MAX_LORA_RANK": "64", "OPTION_MAX_CPU_LORAS": "4"}
# explicit flags (they win over LMI's options): a small pool and context for the test
FLAGS = ["--pool-gb", "0.04", "--max-model-len", "128", "--block-size", "8"]
OFFLINE = dict(pool_gb=0.02, max_model_len=128, block_size=8, max_num_seqs=32)
# the article's three requests, one adapter each (different languages in the article)
ARTICLE_REQUESTS = [
    ("es", "Piensa en una excusa creativa para decir que no necesito ir a la fiesta.", None),
    ("fr", "Pensez à une excuse créative pour dire que je n'ai pas besoin d'aller à la fête.",
     None),
    ("ru", "Придумайте креативное ", {"max_new_tokens": 8, "details": True}),
]
ADAPTERS = {"es": dict(r=8, target_modules=["q_proj", "v_proj"], seed=21),
            "fr": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=22),
            "ru": dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=23)}
MISTRAL_ADAPTER = dict(r=8, target_modules=["q_proj", "o_proj"], seed=24)
EXTRA_ADAPTERS = {"de": dict(r=2, target_modules=["v_proj"], seed=25),
                  "it": dict(r=4, target_modules=["down_proj"], seed=26),
                  "pt": dict(r=2, target_modules=["q_proj"], seed=27)}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory, default_model_dir):
    """A moto S3 server on 127.0.0.1 (a free port), boto3 pointed at it through the standard
    environment (dummy credentials), and a private pagedlora cache; yields a client. (It
    takes ``default_model_dir`` so that the default model is converted in the shared cache
    before this module's cache replaces it.)"""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        mp.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
        mp.setenv("PAGEDLORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        try:
            yield client
        finally:
            server.stop()


@pytest.fixture(scope="module")
def artifacts(s3, tmp_path_factory, tiny_llama_dir, default_model_dir) -> dict:
    """Built as the article builds them: PEFT adapters (``save_pretrained``, one as
    ``adapter_model.bin``) in ``adapters/<name>/``, packed with ``tar czf adapters.tar.gz -C
    dir .`` and uploaded; a second base model uploaded file by file with its own model
    directory (serving.properties, adapters/) packed and uploaded; the first base model in a
    Hugging Face cache folder."""
    root = tmp_path_factory.mktemp("artifacts")
    llama = root / "llama-lora-multi-adapter"
    local = {name: save_random_adapter(tiny_llama_dir, llama / "adapters" / name, **spec)
             for name, spec in ADAPTERS.items()}
    as_bin(local["ru"])
    upload(s3, tarball(llama, root / "adapters.tar.gz"), "code/adapters.tar.gz")
    other = save_random_llama(root / "other-llama", default_model_dir, seed=1)
    for f in sorted(other.iterdir()):  # model.safetensors (13 MB) goes up in multipart
        upload(s3, f, f"models/other-llama/{f.name}")
    mistral = root / "mistral-lora-multi-adapter"
    local["fr-mistral"] = save_random_adapter(other, mistral / "adapters" / "fr-mistral",
                                              **MISTRAL_ADAPTER)
    (mistral / "serving.properties").write_text(
        f"# the second base model\noption.model_id=s3://{BUCKET}/models/other-llama/\n"
        "option.max_rolling_batch_size = 16\noption.dtype: fp32\n")
    upload(s3, tarball(mistral, root / "mistral.tar.gz"), "code/mistral.tar.gz")
    for name, spec in EXTRA_ADAPTERS.items():
        local[name] = save_random_adapter(tiny_llama_dir, root / "extra" / name, **spec)
    for f in sorted(local["de"].iterdir()):
        upload(s3, f, f"runtime/de/{f.name}")
    hub = root / "hub"
    snapshot = hub / "models--test-org--tiny-llama-chat" / "snapshots" / COMMIT
    shutil.copytree(tiny_llama_dir, snapshot)
    (hub / "models--test-org--tiny-llama-chat" / "refs").mkdir()
    (hub / "models--test-org--tiny-llama-chat" / "refs" / "main").write_text(COMMIT)
    return {"root": root, "adapters": local, "other": other, "hub": hub,
            "llama_dir": llama, "mistral_dir": mistral}


@pytest.fixture(scope="module")
def offline(artifacts, tiny_llama_dir) -> dict[str, Engine]:
    """Engines with the deployment's options, for the expected tokens."""
    llama = Engine(tiny_llama_dir, dtype="float16", max_lora_rank=64, max_cpu_loras=4,
                   **OFFLINE)
    for name in [*ADAPTERS, *EXTRA_ADAPTERS]:
        llama.add_adapter(name, artifacts["adapters"][name])
    mistral = Engine(artifacts["other"], dtype="float32", **{**OFFLINE, "max_num_seqs": 16})
    mistral.add_adapter("fr-mistral", artifacts["adapters"]["fr-mistral"])
    return {"llama": llama, "mistral": mistral}


@pytest.fixture(scope="module")
def deployment(s3, artifacts, tmp_path_factory) -> dict:
    """The server's arguments and environment, and its state directory."""
    state = tmp_path_factory.mktemp("state")
    args = ["--sagemaker", "--model-dir", f"llama=s3://{BUCKET}/code/adapters.tar.gz",
            "--model-dir", f"mistral=s3://{BUCKET}/code/mistral.tar.gz", *FLAGS,
            "--state-dir", str(state)]
    env = {**ENV_GENERATION, "HF_HUB_CACHE": str(artifacts["hub"]), "HF_HUB_OFFLINE": "1"}
    return {"args": args, "env": env, "state": state, "logs": tmp_path_factory.mktemp("logs")}


@pytest.fixture(scope="module")
def server(deployment):
    proc = ServerProcess(deployment["args"], deployment["logs"] / "first.log",
                         env=deployment["env"])
    yield proc
    proc.stop()


def as_bin(adapter: Path) -> None:
    """Rewrites a PEFT adapter's weights as ``adapter_model.bin`` (the article's file)."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def tarball(folder: Path, out: Path) -> Path:
    """``tar czf out -C folder .``"""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=".")
    return out


def upload(client, path: Path, key: str) -> str:
    client.upload_file(str(path), BUCKET, key)  # as sagemaker's Session.upload_data
    return f"s3://{BUCKET}/{key}"


def generate(engine: Engine, prompt: str, adapter: str | None, max_tokens: int):
    return engine.generate([prompt], adapters=[adapter], progress=False,
                           sampling_params=SamplingParams(max_tokens=max_tokens,
                                                          temperature=0))[0]


def invoke(server: ServerProcess, body: dict, **headers):
    r = server.post("/invocations", json=body, headers={k.replace("_", "-"): v
                                                        for k, v in headers.items()})
    assert r.status_code == 200, r.text
    return r.json()


# -- the article, end to end ------------------------------------------------------------------


def test_the_articles_requests_answer_with_the_tokens_of_engine_generate(server, offline):
    outs = {}
    for adapter, prompt, params in ARTICLE_REQUESTS:
        body = {"inputs": [prompt], "adapters": [adapter]}
        if params is not None:
            body["parameters"] = params
        got = invoke(server, body, X_Amzn_SageMaker_Inference_Component="llama")
        want = generate(offline["llama"], prompt, adapter, (params or {}).get(
            "max_new_tokens", 30))
        assert [g["generated_text"] for g in got] == [want.text]
        outs[adapter] = want
        if params is not None:  # details: LMI's fields, our tokens
            details = got[0]["details"]
            assert [t["id"] for t in details["tokens"]] == want.token_ids
            assert "".join(t["text"] for t in details["tokens"]) == want.text
            assert details["generated_tokens"] == len(want.token_ids) == 8
            assert details["finish_reason"] == "length" and details["inputs"] == prompt
    base = generate(offline["llama"], ARTICLE_REQUESTS[0][1], None, 30)
    assert base.token_ids != outs["es"].token_ids  # the adapter changes the answer
    assert server.get("/ping").json() == {"status": "healthy"}


def test_a_second_base_model_is_chosen_by_the_inference_component_header(server, offline):
    prompt = "Pensez à une excuse créative."
    got = invoke(server, {"inputs": [prompt], "adapters": ["fr-mistral"]},
                 X_Amzn_SageMaker_Inference_Component="mistral")
    assert got[0]["generated_text"] == generate(offline["mistral"], prompt, "fr-mistral",
                                                30).text
    base = {"inputs": "Just the base", "parameters": {"max_new_tokens": 8}}
    by_model = {m: invoke(server, base, X_Amzn_SageMaker_Inference_Component=m)
                for m in ("llama", "mistral")}
    assert by_model == {m: {"generated_text": generate(offline[m], "Just the base", None,
                                                       8).text} for m in by_model}
    assert by_model["llama"] != by_model["mistral"]


def test_adapters_chosen_by_sagemaker_headers_as_lmi_reads_them(server, offline):
    prompt = "Choose by header"
    eight = {"max_new_tokens": 8}
    want = {a: generate(offline["llama"], prompt, a, 8).text for a in ("es", "fr")}
    llama = {"X_Amzn_SageMaker_Inference_Component": "llama"}
    custom = invoke(server, {"inputs": prompt, "parameters": eight},
                    X_Amzn_SageMaker_Custom_Attributes="trace=1; adapter=fr", **llama)
    identifier = invoke(server, {"inputs": prompt, "parameters": eight},
                        X_Amzn_SageMaker_Adapter_Identifier="es", **llama)
    query = server.post("/invocations?adapter=es", json={"inputs": prompt, "parameters": eight},
                        headers={"X-Amzn-SageMaker-Inference-Component": "llama"}).json()
    assert custom == {"generated_text": want["fr"]}
    assert identifier == query == {"generated_text": want["es"]}
    empty = invoke(server, {"inputs": [prompt], "adapters": [""], "parameters": eight}, **llama)
    assert empty == [{"generated_text": generate(offline["llama"], prompt, None, 8).text}]
    clash = server.post("/invocations", json={"inputs": prompt, "adapters": "es"},
                        headers={"X-Amzn-SageMaker-Custom-Attributes": "adapter=fr"})
    assert clash.status_code == 400 and "named differently" in clash.text, clash.text


def test_return_full_text_stop_sequences_and_unsupported_parameters(server, offline):
    prompt = "Tell me"
    want = generate(offline["llama"], prompt, "fr", 8)
    full = invoke(server, {"inputs": prompt, "adapters": "fr", "parameters": {
        "max_new_tokens": 8, "return_full_text": True}})
    assert full == {"generated_text": prompt + want.text}
    stop = want.text[2:5]
    cut = invoke(server, {"inputs": prompt, "adapters": "fr", "parameters": {
        "max_new_tokens": 8, "stop_sequences": [stop], "details": True}})
    assert cut["generated_text"] == want.text[:want.text.index(stop)]
    assert cut["details"]["finish_reason"] == "stop_sequence"
    bad = server.post("/invocations", json={"inputs": prompt, "adapters": "fr",
                                            "parameters": {"num_beams": 4}})
    assert bad.status_code == 400 and "num_beams=4 is not supported" in bad.text


def test_lmi_adapter_management_api(server, offline, artifacts):
    listed = server.get("/models/llama/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == ["es", "fr", "ru"]
    assert all(a["pin"] is False and a["preload"] is False for a in listed)
    page = server.get("/models/llama/adapters?limit=2").json()
    assert [a["name"] for a in page["adapters"]] == ["es", "fr"] and page["nextPageToken"] == "2"
    assert [a["name"] for a in server.get("/models/llama/adapters?limit=2&next_page_token=2")
            .json()["adapters"]] == ["ru"]
    src = str(artifacts["adapters"]["it"])
    r = server.post("/models/llama/adapters", params={"name": "it", "src": src})
    assert r.status_code == 200 and r.json() == {"status": "Adapter it registered"}, r.text
    assert server.get("/models/llama/adapters/it").json() == {
        "name": "it", "src": src, "preload": True, "pin": False}
    got = invoke(server, {"inputs": "Ciao", "adapters": "it", "parameters": {
        "max_new_tokens": 8}})
    assert got == {"generated_text": generate(offline["llama"], "Ciao", "it", 8).text}
    assert server.delete("/models/llama/adapters/it").json() == {
        "status": "Adapter it unregistered"}
    assert [a["name"] for a in server.get("/models/llama/adapters").json()["adapters"]] == [
        "es", "fr", "ru"]


BAD_ADAPTER_CALLS = [  # (method, path, params, status, words the message must hold)
    ("get", "/models/nobase/adapters", None, 404, ["'nobase'"]),
    ("get", "/models/llama/adapters/nope", None, 404, ["'nope'", "'llama'", "'es'"]),
    ("get", "/models/llama/adapters/fr-mistral", None, 404, ["'fr-mistral'"]),
    ("get", "/adapters", None, 400, ["several base models"]),
    ("get", "/models/llama/adapters?limit=lots", None, 400, ["limit"]),
    ("delete", "/models/llama/adapters/gone", None, 404, ["'gone'"]),
    ("delete", "/models/mistral/adapters/es", None, 404, ["'es'", "'mistral'"]),
    ("post", "/models/llama/adapters", {"name": "x"}, 400, ["src", "Field required"]),
    ("post", "/models/llama/adapters", {"name": "x", "src": "/nowhere", "pin": "true"}, 400,
     ["pin=True is not supported"]),
    ("post", "/models/llama/adapters", {"name": "x", "src": "/nowhere", "bogus": "1"}, 400,
     ["bogus", "unsupported field"]),
    ("post", "/models/llama/adapters", {"name": "fr-mistral", "src": "/nowhere"}, 400,
     ["'fr-mistral'", "already served", "'mistral'"]),
    ("post", "/models/llama/adapters", {"name": "llama", "src": "/nowhere"}, 400,
     ["'llama'", "base model"]),
    ("post", "/models/llama/adapters", {"name": "x", "src": "/nowhere"}, 400,
     ["/nowhere", "is not a directory"]),
    ("post", "/models/llama/adapters", {"name": "x", "src": f"s3://{BUCKET}/missing/key"},
     400, [f"s3://{BUCKET}/missing/key", "no such object"]),
    ("post", "/models/llama/adapters", {"name": "x", "src": "s3://no-such-bucket-here/a"},
     400, ["s3://no-such-bucket-here/a", "does not exist"]),
]


@pytest.mark.parametrize("method,path,params,status,words", BAD_ADAPTER_CALLS,
                         ids=[f"{i}-{m}" for i, (m, *_) in enumerate(BAD_ADAPTER_CALLS)])
def test_adapter_management_errors_are_those_of_the_vllm_routes(server, method, path, params,
                                                                  status, words):
    r = getattr(server, method)(path, params=params)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message
    names = {m["id"] for m in server.get("/v1/models").json()["data"]}
    assert "x" not in names  # nothing half-registered


def test_runtime_adapters_survive_a_restart(server, deployment, offline, artifacts):
    gone = artifacts["root"] / "gone"
    shutil.copytree(artifacts["adapters"]["pt"], gone)
    loads = [server.post("/v1/load_lora_adapter", json={
                 "lora_name": "de", "lora_path": f"s3://{BUCKET}/runtime/de/",
                 "model": "llama"}),
             server.post("/models/llama/adapters", json={
                 "name": "it", "src": str(artifacts["adapters"]["it"]), "preload": False}),
             server.post("/models/llama/adapters", params={"name": "pt", "src": str(gone)})]
    assert [r.status_code for r in loads] == [200] * 3, [r.text for r in loads]
    recorded = json.loads((deployment["state"] / "adapters.json").read_text())
    assert [e["name"] for e in recorded["adapters"]] == ["de", "it", "pt"]
    server.stop()
    shutil.rmtree(gone)  # this entry's source is gone: reported and skipped at the restart
    again = ServerProcess(deployment["args"], deployment["logs"] / "again.log",
                          env=deployment["env"])
    try:
        names = [a["name"] for a in again.get("/models/llama/adapters").json()["adapters"]]
        assert names == ["de", "es", "fr", "it", "ru"]
        for name in ("de", "it"):
            got = invoke(again, {"inputs": "After the restart", "adapters": name,
                                 "parameters": {"max_new_tokens": 8}})
            want = generate(offline["llama"], "After the restart", name, 8).text
            assert got == {"generated_text": want}
        log = again.log_text()
        assert "adapter 'pt' of 'llama'" in log and "skipped" in log, log
        recorded = json.loads((deployment["state"] / "adapters.json").read_text())
        assert [e["name"] for e in recorded["adapters"]] == ["de", "it"]
    finally:
        again.stop()


# -- configuration, in process ----------------------------------------------------------------


def config(argv, env):
    return server_config(build_parser().parse_args(["serve", *argv]), env)


@pytest.fixture
def model_dir(tmp_path, tiny_llama_dir):
    """An LMI model directory naming the tiny model, with serving.properties and adapters/."""
    folder = tmp_path / "model"
    save_random_adapter(tiny_llama_dir, folder / "adapters" / "es", **ADAPTERS["es"])
    (folder / "serving.properties").write_text(
        f"option.model_id={tiny_llama_dir}\noption.max_rolling_batch_size=8\n"
        "option.dtype=fp32\n! a comment\noption.max_loras=\\\n  3\n")
    return folder


def test_precedence_flags_over_serving_properties_over_environment(model_dir, tiny_llama_dir):
    tiny = tiny_llama_dir
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "32", "OPTION_DTYPE": "fp16",
           "OPTION_MAX_LORA_RANK": "16", "MAX_BATCH_SIZE": "64", "OPTION_ENABLE_LORA": "true",
           "OPTION_MAX_CPU_LORAS": "", "SAGEMAKER_BIND_TO_PORT": "9001",
           "SERVING_JOB_QUEUE_SIZE": "12", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2"}
    c = config(["--model-dir", f"m={model_dir}", "--max-lora-rank", "32", "--sagemaker"], env)
    assert c.model_options["m"] == {"max_num_seqs": 8, "dtype": "float32", "max_loras": 3}
    engine = c.engine_config("m")
    assert (engine.max_num_seqs, engine.dtype, engine.max_lora_rank, engine.max_cpu_loras) == (
        8, "float32", 32, None)  # properties > env; the flag > env; empty values skipped
    assert [(a.model, a.path) for a in c.adapters] == [("m", model_dir / "adapters")]
    assert (c.host, c.port, c.max_queue, c.max_body_bytes) == ("0.0.0.0", 9001, 12, 2 * 2**20)
    flags = config(["--model-dir", str(model_dir), "--port", "7000", "--max-queue", "5",
                    "--max-num-seqs", "2"], env)
    assert (flags.host, flags.port, flags.max_queue) == ("127.0.0.1", 7000, 5)
    name = next(iter(flags.models))
    assert name == "model" and flags.engine_config(name).max_num_seqs == 2
    (model_dir / "serving.properties").unlink()
    with pytest.raises(FileNotFoundError, match="nothing"):
        config(["--model-dir", str(model_dir)],
               {**env, "OPTION_MODEL_ID": str(model_dir.parent / "nothing")})
    # OPTION_* wins over LMI's aliases (HF_MODEL_ID would be looked up in the HF cache)
    alias = config(["--model-dir", str(model_dir)],
                   {**env, "HF_MODEL_ID": "ignored/alias", "OPTION_MODEL_ID": str(tiny)})
    assert alias.engine_config("model").max_num_seqs == 32 and alias.models["model"] == tiny


def test_adapters_folder_needs_enable_lora(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        c = config(["--model-dir", str(model_dir)], {})
    assert c.adapters == ()
    assert "OPTION_ENABLE_LORA=true" in caplog.text and "adapters" in caplog.text


REFUSED = {"OPTION_DTYPE": "int8",
           "OPTION_ROLLING_BATCH": "bogus", "OPTION_QUANTIZE": "awq",
           "OPTION_ENTRYPOINT": "model.py", "OPTION_MAX_ROLLING_BATCH_SIZE": "lots",
           "OPTION_TGI_COMPAT": "true", "OPTION_OUTPUT_FORMATTER": "jsonlines",
           "OPTION_GPU_MEMORY_UTILIZATION": "1.5", "OPTION_ENABLE_LORA": "yes",
           "OPTION_PIPELINE_PARALLEL_DEGREE": "2", "OPTION_LORA_DTYPE": "fp8",
           "OPTION_LONG_LORA_SCALING_FACTORS": "3.0,4.0"}


def test_every_refused_option_is_named_with_its_value(model_dir, monkeypatch, capsys):
    (model_dir / "serving.properties").unlink()  # its values would win over the environment
    with pytest.raises(LmiConfigError) as e:
        config(["--model-dir", str(model_dir)], REFUSED)
    for key, value in REFUSED.items():
        assert f"{key}={value!r}" in str(e.value), (key, str(e.value))
    for key, value in REFUSED.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:  # pagedlora serve stops before loading a model
        main(["serve", "--model-dir", str(model_dir)])
    assert exit_.value.code == 2
    assert "OPTION_DTYPE='int8'" in capsys.readouterr().err


def test_unknown_options_are_warnings_and_notes_never_show_secrets(model_dir, caplog):
    (model_dir / "serving.properties").write_text(
        (model_dir / "serving.properties").read_text() + "option.frobnicate=1\n")
    env = {"OPTION_WIBBLE": "2", "HF_TOKEN": "hf_secret_value", **ENV_GENERATION,
           "OPTION_MODEL_ID": str(model_dir)}
    with caplog.at_level(logging.INFO):
        config(["--model-dir", str(model_dir)], env)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("OPTION_WIBBLE='2'" in w and "unknown" in w for w in warnings), warnings
    assert any("option.frobnicate in" in w for w in warnings), warnings
    assert "OPTION_ROLLING_BATCH='lmi-dist': accepted without effect" in caplog.text
    assert "gpu_memory_utilization=0.8: the device is cpu" in caplog.text
    assert "HF_TOKEN=<hidden>" in caplog.text and "hf_secret_value" not in caplog.text


def test_tensor_parallel_degree_is_tensor_parallel_size_and_max_the_devices_there_are():
    one = map_settings(settings({"OPTION_TENSOR_PARALLEL_DEGREE": "max"}), num_devices=1)
    assert one.refused == [] and one.engine == {"tensor_parallel_size": 1}
    two = map_settings(settings({"TENSOR_PARALLEL_DEGREE": "max"}), num_devices=2)
    assert two.refused == [] and two.engine == {"tensor_parallel_size": 2}
    four = map_settings(settings({"OPTION_TENSOR_PARALLEL_DEGREE": "4"}), num_devices=1)
    assert four.engine == {"tensor_parallel_size": 4}
    zero = map_settings(settings({"OPTION_TENSOR_PARALLEL_DEGREE": "0"}), num_devices=1)
    assert zero.refused == ["OPTION_TENSOR_PARALLEL_DEGREE='0': expected an integer >= 1"]


def test_sagemaker_defaults_to_opt_ml_model():
    with pytest.raises(FileNotFoundError, match="/opt/ml/model"):
        config(["--sagemaker"], {})


def test_properties_file_format(tmp_path):
    path = tmp_path / "serving.properties"
    path.write_text("# comment\n! another\nengine=Python\noption.a : 1\noption.b 2\n"
                    "option.long=x,\\\n    y\n\noption.empty=\n")
    assert read_properties(path) == {"engine": "Python", "option.a": "1", "option.b": "2",
                                     "option.long": "x,y", "option.empty": ""}


def test_weight_bytes_from_the_safetensors_headers(tiny_llama_dir):
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    numel = sum(t.numel() for t in tensors.values())
    assert weight_bytes(tiny_llama_dir, "float16") == 2 * numel
    assert weight_bytes(tiny_llama_dir, "float32") == 4 * numel


# -- bad sources, in process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, pool_gb=0.01, block_size=8, max_model_len=64)


def archive_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_missing_bucket_and_key_name_the_url(s3, small_engine):
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-here/m: bucket .* does not"):
        fetch("s3://no-such-bucket-here/m")
    with pytest.raises(AdapterError, match=f"s3://{BUCKET}/nothing/here: no such object"):
        small_engine.add_adapters_from_dir(f"s3://{BUCKET}/nothing/here")
    with pytest.raises(AdapterError, match=f"s3://{BUCKET}/nope.tar.gz: no such object"):
        small_engine.add_adapter("x", f"s3://{BUCKET}/nope.tar.gz")
    assert small_engine.adapters.names == []


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "outside"])
def test_bad_tarballs_name_the_url_and_register_nothing(s3, small_engine, artifacts, kind):
    good = (artifacts["root"] / "adapters.tar.gz").read_bytes()
    data = {"truncated": good[:len(good) // 2], "corrupt": b"\x1f\x8b" + bytes(range(256)) * 8,
            "outside": archive_bytes({"adapters/ok/adapter_config.json": b"{}",
                                      "../escaped/adapter_config.json": b"{}"})}[kind]
    s3.put_object(Bucket=BUCKET, Key=f"bad/{kind}.tar.gz", Body=data)
    url = f"s3://{BUCKET}/bad/{kind}.tar.gz"
    words = {"truncated": "EOFError|ReadError", "corrupt": "is not a tar archive",
             "outside": "OutsideDestinationError"}[kind]
    with pytest.raises(AdapterError, match=f"adapters archive {url}.*({words})"):
        small_engine.add_adapters_from_dir(url)
    assert small_engine.adapters.names == []
    cache = Path(os.environ["PAGEDLORA_CACHE"])
    assert not [p for p in cache.rglob(".tmp-*")]  # no half entry left behind
    assert not list(cache.rglob("escaped"))


def test_an_unreachable_endpoint_times_out_naming_the_url(monkeypatch):
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        with pytest.raises(SourceError, match=rf"s3://{BUCKET}/m: cannot reach the S3 endpoint "
                                              rf"{endpoint}.*read timeout 0.3 s, 1 attempt"):
            fetch(f"s3://{BUCKET}/m", s3=S3Options(connect_timeout_s=0.3, read_timeout_s=0.3,
                                                    max_attempts=1))


def test_downloads_are_checked_and_a_damaged_cached_copy_is_fetched_again(s3, artifacts):
    url = f"s3://{BUCKET}/models/other-llama/"
    folder = fetch(url)
    weights = folder / "model.safetensors"
    assert weights.read_bytes() == (artifacts["other"] / "model.safetensors").read_bytes()
    head = s3.head_object(Bucket=BUCKET, Key="models/other-llama/model.safetensors")
    etag, part = head["ETag"].strip('"'), s3.head_object(
        Bucket=BUCKET, Key="models/other-llama/model.safetensors", PartNumber=1)
    assert etag.endswith("-2")  # uploaded in two parts: the multipart ETag was recomputed
    check_download(weights, url, head["ContentLength"], etag, part["ContentLength"])
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    damaged = folder.parent / "damaged.bin"
    damaged.write_bytes(data)
    with pytest.raises(SourceError, match="MD5 .* differs from the ETag"):
        check_download(damaged, url, head["ContentLength"], etag, part["ContentLength"])
    damaged.write_bytes(b"12345")
    with pytest.raises(SourceError, match="downloaded 5 bytes, S3 lists"):
        check_download(damaged, url, head["ContentLength"], etag, part["ContentLength"])
    weights.write_bytes(b"truncated")  # the cached copy is damaged: downloaded again
    assert fetch(url) == folder
    assert weights.read_bytes() == (artifacts["other"] / "model.safetensors").read_bytes()


def test_a_model_id_must_be_in_the_local_hugging_face_cache(artifacts, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(artifacts["hub"]))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(artifacts["hub"]))
    assert fetch(HF_ID) == artifacts["hub"] / "models--test-org--tiny-llama-chat" / \
        "snapshots" / COMMIT
    with pytest.raises(SourceError, match="'test-org/absent' is neither a local path nor in "
                                          "the local Hugging Face cache.*huggingface-cli "
                                          "download test-org/absent"):
        fetch("test-org/absent")
    with pytest.raises(SourceError, match="at revision 'v2'"):
        fetch(HF_ID, revision="v2")
