"""Engine spec, container body and metrics parsing: pure logic, no Docker."""

from dataclasses import replace
from pathlib import Path

import pytest

from garage_node.node.config import EngineSection
from garage_node.node.engine.metrics import parse_metrics
from garage_node.node.engine.spec import EngineConfigError, desired_spec, secret_env
from garage_node.node.gpu import GPU, Inventory
from testing.driver_tree import DriverGPU, make_driver_tree

ROOT = Path(__file__).resolve().parents[2]
CATALOG = str(ROOT / "configs/models.toml")


def gpus(*mibs, cc="8.9"):
    return Inventory(tuple(GPU(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}", m, m, cc, 40, 30.0, 0) for i, m in enumerate(mibs)),
                     "550.54.14", "12.4", pci_bus_ids=tuple((i, f"0000:{i + 1:02x}:00.0") for i in range(len(mibs))))


@pytest.fixture
def driver_root(tmp_path):
    # NVML index i sits on bus i+1 (see gpus()); the driver numbers them the other way round.
    return make_driver_tree(tmp_path / "host", [DriverGPU("0000:01:00.0", 1), DriverGPU("0000:02:00.0", 0)])


def test_gpu_plan_becomes_container_spec(driver_root):
    cfg = EngineSection(catalog=CATALOG, image="vllm/vllm-openai:v0.32.0", driver_root=driver_root)
    spec, why = desired_spec(cfg, gpus(24564), "100.96.0.2")
    body = spec.container_body({})
    assert body["HostConfig"]["PortBindings"] == {"8000/tcp": [{"HostIp": "100.96.0.2", "HostPort": "8000"}]}
    assert "DeviceRequests" not in body["HostConfig"]
    assert body["HostConfig"]["ShmSize"] == 2048 * 1024 * 1024
    cmd = body["Cmd"]
    assert cmd[cmd.index("--served-model-name") + 1] == spec.model and "--tensor-parallel-size" in cmd
    assert body["Labels"]["garage-node.spec-hash"] == spec.spec_hash
    assert spec.model in why


def test_hub_token_reaches_the_container_env_only(driver_root):
    cfg = EngineSection(catalog=CATALOG, hub_token="hf_secret_value", driver_root=driver_root)
    spec, _ = desired_spec(cfg, gpus(24564), "100.96.0.2")
    body = spec.container_body(secret_env(cfg))
    assert "HF_TOKEN=hf_secret_value" in body["Env"]
    assert "hf_secret_value" not in repr(spec) + str(body["Labels"]) + " ".join(body["Cmd"])
    other, _ = desired_spec(replace(cfg, hub_token="hf_other"), gpus(24564), "100.96.0.2")
    assert other.spec_hash != spec.spec_hash  # a new token replaces the container
    assert "hf_secret_value" not in repr(cfg)


def test_cpu_engine_with_local_model_dir():
    cfg = EngineSection(catalog=CATALOG, device="cpu", model="garage/tiny-llama-test", model_dir="/srv/tiny",
                        max_model_len=512, extra_args=("--load-format", "dummy"))
    spec, _ = desired_spec(cfg, Inventory(nvml_error="no driver"), "100.96.0.9")
    body = spec.container_body({})
    assert "DeviceRequests" not in body["HostConfig"]
    assert {"Type": "bind", "Source": "/srv/tiny", "Target": "/models/served", "ReadOnly": True} in body["HostConfig"]["Mounts"]
    cmd = body["Cmd"]
    assert cmd[cmd.index("--model") + 1] == "/models/served"
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--max-model-len") + 1] == "512"
    assert cmd[-6:-4] == ["--load-format", "dummy"]


def test_spec_changes_change_the_hash():
    cfg = EngineSection(catalog=CATALOG, device="cpu", model="garage/tiny-llama-test")
    a, _ = desired_spec(cfg, Inventory(), "100.96.0.9")
    b, _ = desired_spec(replace(cfg, max_model_len=256), Inventory(), "100.96.0.9")
    c, _ = desired_spec(cfg, Inventory(), "100.96.0.9")
    assert a.spec_hash == c.spec_hash != b.spec_hash


@pytest.mark.parametrize("cfg, words", [
    (EngineSection(catalog=CATALOG, device="cpu"), "no engine.model"),
    (EngineSection(catalog=CATALOG, device="cpu", model="nope/nothing"), "not in the catalog"),
    (EngineSection(catalog=CATALOG, model="qwen2.5-32b"), "would fit instead"),
    (EngineSection(catalog="/nonexistent/models.toml"), "model catalog unusable"),
])
def test_refusals_say_what_to_do(cfg, words):
    with pytest.raises(EngineConfigError, match=words):
        desired_spec(cfg, gpus(8188), "100.96.0.2")


METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
"""


def test_parse_metrics():
    m = parse_metrics(METRICS)
    assert (m.running, m.waiting, m.generation_tokens_total) == (2, 1, 1234.0)
    assert parse_metrics("") == parse_metrics("# nothing\n")


# ------------------------------------------------------------------ what the head assigns (#18)

def test_an_assigned_pipeline_over_unequal_gpus_becomes_its_arguments_and_layer_split(driver_root):
    from garage_node.core.wire import Assignment
    from garage_node.node.engine.spec import assigned_spec

    cfg = EngineSection(catalog=CATALOG, image="vllm/vllm-openai:v0.32.0", driver_root=driver_root,
                        gpu_access="nvidia-toolkit")
    inv = Inventory((GPU(0, "NVIDIA GeForce RTX 4090", "GPU-0", 24564, 24564, "8.9", 40, 30.0, 0),
                     GPU(1, "NVIDIA GeForce RTX 4060", "GPU-1", 8188, 8188, "8.9", 40, 30.0, 0)), "550.54.14", "12.4")
    a = Assignment(generation=3, model="qwen2.5-14b", quantization="bf16", max_model_len=8192, gpu_indices=[0, 1],
                   tensor_parallel_size=1, pipeline_parallel_size=2, layer_partition=[36, 12], reason="fits their sum")
    spec, why = assigned_spec(cfg, inv, "100.96.0.2", "key", a, model_dir="/w/qwen2.5-14b/model")
    args = list(spec.args)
    assert args[args.index("--pipeline-parallel-size") + 1] == "2" and args[args.index("--tensor-parallel-size") + 1] == "1"
    assert args[args.index("--max-model-len") + 1] == "8192" and args[args.index("--model") + 1] == "/models/served"
    assert dict(spec.env)["VLLM_PP_LAYER_PARTITION"] == "36,12" and spec.gpu_ids == ("0", "1")
    assert spec.model_dir == "/w/qwen2.5-14b/model" and "PP 2" in why and "assigned by the head" in why
    body = spec.container_body({})
    assert "VLLM_PP_LAYER_PARTITION=36,12" in body["Env"]
    assert body["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]


@pytest.mark.parametrize("change, words", [
    (dict(gpu_indices=[0, 5]), "the assigned GPUs [5] are not healthy GPUs of this PC"),
    (dict(tensor_parallel_size=2), "TP 2 x PP 1 does not match the 1 GPUs assigned"),
    (dict(model="qwen2.5-32b", quantization="bf16"), "the assignment does not fit this PC's GPUs [0]"),
    (dict(model="no-such-model"), "the assigned model no-such-model is not in this PC's catalog"),
    (dict(quantization="int3"), "is not offered in int3"),
])
def test_an_assignment_this_pc_cannot_serve_is_refused_with_why(driver_root, change, words):
    from garage_node.core.wire import Assignment
    from garage_node.node.engine.spec import assigned_spec

    cfg = EngineSection(catalog=CATALOG, image="vllm/vllm-openai:v0.32.0", driver_root=driver_root,
                        gpu_access="nvidia-toolkit")
    a = replace(Assignment(generation=1, model="qwen2.5-7b", gpu_indices=[0]), **change)
    with pytest.raises(EngineConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        assigned_spec(cfg, gpus(24564), "100.96.0.2", "", a)


def _imported_entry(**change):
    """A model the operator imported at the head (`head model import`), as the assignment
    carries it: the PC's catalog (configs/models.toml) has no 'phi-tiny'."""
    from garage_node.core.wire import CatalogModel, CatalogPrecision

    entry = CatalogModel(name="phi-tiny", id="example/phi-tiny", parameters=3_800_000_000, num_layers=32,
                         num_attention_heads=32, num_kv_heads=32, head_dim=96, default_context_length=4096,
                         min_compute_capability="7.5",
                         quantizations=[CatalogPrecision("bf16", 2.0, "bfloat16", "example/phi-tiny"),
                                        CatalogPrecision("awq", 0.6, "float16", "example/phi-tiny-AWQ", "awq", "7.5")])
    return replace(entry, **change)


def test_a_model_only_the_heads_catalog_has_is_planned_from_the_assignments_entry(driver_root):
    from garage_node.core.wire import Assignment
    from garage_node.node.engine.spec import assigned_spec

    cfg = EngineSection(catalog=CATALOG, image="vllm/vllm-openai:v0.32.0", driver_root=driver_root,
                        gpu_access="nvidia-toolkit")
    a = Assignment(generation=2, model="phi-tiny", quantization="awq", gpu_indices=[0], reason="imported")
    with pytest.raises(EngineConfigError, match="not in this PC's catalog"):
        assigned_spec(cfg, gpus(24564), "100.96.0.2", "", a)  # an older head: its own catalog only
    spec, why = assigned_spec(cfg, gpus(24564), "100.96.0.2", "", replace(a, catalog_entry=_imported_entry()))
    args = list(spec.args)
    assert spec.model == "example/phi-tiny" and args[args.index("--model") + 1] == "example/phi-tiny-AWQ"
    assert args[args.index("--quantization") + 1] == "awq" and args[args.index("--max-model-len") + 1] == "4096"
    # Its own fit check still runs on the head's facts: a model of this size does not fit 8 GB in bf16.
    big = replace(a, quantization="bf16", catalog_entry=_imported_entry(parameters=14_000_000_000))
    with pytest.raises(EngineConfigError, match="does not fit this PC's GPUs"):
        assigned_spec(cfg, gpus(8188), "100.96.0.2", "", big)
    # An entry that fails the catalog's checks is refused, naming the key.
    bad = replace(a, catalog_entry=_imported_entry(num_kv_heads=5))
    with pytest.raises(EngineConfigError, match="num_kv_heads"):
        assigned_spec(cfg, gpus(24564), "100.96.0.2", "", bad)


def test_the_pcs_own_entry_is_used_when_the_facts_agree_else_the_heads():
    from garage_node.placement.catalog import entry_of, load_catalog, with_entry

    catalog = load_catalog(CATALOG)
    own = catalog.resolve("qwen2.5-7b")[0]
    same, used_own = with_entry(catalog, entry_of(own), "head")
    assert used_own and same is catalog
    changed = replace(entry_of(own), default_context_length=8192)
    other, used_own = with_entry(catalog, changed, "head")
    assert not used_own and other.resolve("qwen2.5-7b")[0].default_context_length == 8192
    assert other.resolve(own.id)[0].default_context_length == 8192  # by repo id too: one entry, the head's
    assert len(other.models) == len(catalog.models)


def test_a_cpu_engine_runs_eager_logprob_kernels_unless_its_owner_says_otherwise(driver_root):
    """vLLM's CPU build compiled its logprob kernels with torch.compile and died on the first
    request asking for logprobs (the image has no C++ compiler): CPU engines get
    TORCHDYNAMO_DISABLE=1; an [engine] env of the owner's wins; GPU engines are left alone."""
    cfg = EngineSection(catalog=CATALOG, device="cpu", model="garage/tiny-llama-test")
    cpu = desired_spec(cfg, Inventory(()), "100.96.0.2")[0]
    assert dict(cpu.env)["TORCHDYNAMO_DISABLE"] == "1"
    assert "TORCHDYNAMO_DISABLE=1" in cpu.container_body({})["Env"]
    owner = desired_spec(replace(cfg, env={"TORCHDYNAMO_DISABLE": "0"}), Inventory(()), "100.96.0.2")[0]
    assert dict(owner.env)["TORCHDYNAMO_DISABLE"] == "0"
    gpu = desired_spec(EngineSection(catalog=CATALOG, image="vllm/vllm-openai:v0.32.0", driver_root=driver_root),
                       gpus(24564), "100.96.0.2")[0]
    assert "TORCHDYNAMO_DISABLE" not in dict(gpu.env)
