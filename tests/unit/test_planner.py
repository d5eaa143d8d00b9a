"""The planner: which catalog model, precision, context and tensor parallelism fit a node's GPUs.

Expectations are exact (model, quantization, TP, max_model_len) so a change to the catalog numbers
or to the overhead constants shows up here as a deliberate test change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The package need not be installed to run these tests.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from garage_node.node.gpu import GPU, Inventory  # noqa: E402
from garage_node.placement.catalog import CatalogError, load_catalog  # noqa: E402
from garage_node.placement.fit import (  # noqa: E402
    MIB,
    OVERHEAD_FIXED_MIB,
    OVERHEAD_WEIGHT_FRACTION,
    CpuOnlyRefusal,
    PlanError,
    plan,
)

CATALOG_PATH = REPO / "configs" / "models.toml"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(CATALOG_PATH)


def gpu(index: int, name: str, mib: int, cc: str | None, healthy: bool = True) -> GPU:
    return GPU(
        index=index, name=name, uuid=f"GPU-{index}", memory_total_mib=mib, memory_free_mib=mib,
        compute_capability=cc, temperature_c=40, power_w=30.0, utilization_pct=0, healthy=healthy,
        error=None if healthy else "Xid 79: fallen off the bus",
    )


def node(*gpus: GPU) -> Inventory:
    return Inventory(gpus=tuple(gpus), driver_version="535.183.01", cuda_version="12.2")


RTX_4060 = ("NVIDIA GeForce RTX 4060", 8188, "8.9")
RTX_3060 = ("NVIDIA GeForce RTX 3060", 12288, "8.6")
RTX_4070 = ("NVIDIA GeForce RTX 4070", 12282, "8.9")
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564, "8.9")
RTX_16GB = ("NVIDIA GeForce RTX 4060 Ti", 16380, "8.9")


def node_of(*cards: tuple[str, int, str], unhealthy: tuple[int, ...] = ()) -> Inventory:
    return node(*(gpu(i, *c, healthy=i not in unhealthy) for i, c in enumerate(cards)))


def assert_fits(p) -> None:
    """weights + overhead + KV cache <= budget, recomputed here from the catalog facts."""
    m, q, tp = p.model, p.quantization, p.tensor_parallel_size
    weights = m.parameters * q.bytes_per_param / MIB / tp
    overhead = OVERHEAD_FIXED_MIB + OVERHEAD_WEIGHT_FRACTION * weights
    kv_heads = -(-m.num_kv_heads // tp)
    kv = p.max_model_len * 2 * m.num_layers * kv_heads * m.head_dim * q.kv_bytes / MIB
    budget = p.gpus[0].memory_total_mib * p.gpu_memory_utilization
    assert p.weights_mib == pytest.approx(weights)
    assert p.overhead_mib == pytest.approx(overhead)
    assert p.kv_cache_mib == pytest.approx(kv)
    assert p.budget_mib == pytest.approx(budget)
    assert weights + overhead + kv <= budget
    assert p.max_model_len % 256 == 0 or p.max_model_len == m.default_context_length
    assert p.max_model_len >= 4096


# ---------------------------------------------------------------- catalog


def test_catalog_has_a_ladder_and_a_test_model(catalog):
    names = [m.name for m in catalog.models]
    assert names == ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b",
                     "qwen2.5-32b", "tiny-llama-test"]
    seven = catalog.resolve("Qwen/Qwen2.5-7B-Instruct")[0]
    assert (seven.num_layers, seven.num_kv_heads, seven.head_dim) == (28, 4, 128)
    awq = seven.quantization("awq")
    assert awq.model_id == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert (awq.dtype, awq.vllm_quantization) == ("float16", "awq")
    assert seven.quantization("fp8").min_compute_capability == (8, 9)
    assert seven.quantization("bf16").model_id == seven.id  # default: the model's own repo
    tiny = catalog.resolve("garage/tiny-llama-test")[0]
    assert tiny.test_only and tiny.parameters < 10_000_000
    assert not any(m.test_only for m in catalog.models if m is not tiny)


def test_kv_cache_arithmetic(catalog):
    m = catalog.resolve("qwen2.5-32b")[0]
    bf16 = m.quantization("bf16")
    assert m.kv_bytes_per_token(bf16, 1) == 2 * 64 * 8 * 128 * 2  # 256 KiB
    assert m.kv_bytes_per_token(bf16, 2) == 2 * 64 * 4 * 128 * 2
    # Fewer KV heads than GPUs: vLLM replicates them, one head per GPU.
    small = catalog.resolve("qwen2.5-3b")[0]
    assert small.kv_bytes_per_token(small.quantization("bf16"), 4) == 2 * 36 * 1 * 128 * 2
    assert catalog.resolve("qwen2.5-0.5b")[0].supports_tp(2)
    assert not catalog.resolve("qwen2.5-0.5b")[0].supports_tp(4)  # 14 attention heads


# ---------------------------------------------------------------- the four reference nodes


@pytest.mark.parametrize(
    "inventory, expected",
    [
        # 8 GB: only int4 weights leave room for a useful context.
        (node_of(RTX_4060), ("qwen2.5-7b", "awq", 1, 14080, (0,))),
        # 12 GB Ampere: 14B AWQ leaves no room for 4096 tokens; fp8 is not for cc 8.6.
        (node_of(RTX_3060), ("qwen2.5-7b", "awq", 1, 32768, (0,))),
        # 24 GB: 32B in int4 with a reduced context.
        (node_of(RTX_4090), ("qwen2.5-32b", "awq", 1, 7424, (0,))),
        # 2 x 16 GB: 32B AWQ (17.9 GiB) fits on neither card alone, on both with TP 2.
        (node_of(RTX_16GB, RTX_16GB), ("qwen2.5-32b", "awq", 2, 32768, (0, 1))),
    ],
    ids=["8GB-4060", "12GB-3060", "24GB-4090", "2x16GB"],
)
def test_reference_nodes(catalog, inventory, expected):
    p = plan(inventory, catalog)
    got = (p.model.name, p.quantization.name, p.tensor_parallel_size, p.max_model_len, p.gpu_indices)
    assert got == expected
    assert p.gpu_memory_utilization == 0.90
    assert_fits(p)


def test_engine_args_for_8gb_node(catalog):
    p = plan(node_of(RTX_4060), catalog)
    assert p.engine_args() == [
        "--model", "Qwen/Qwen2.5-7B-Instruct-AWQ",
        "--dtype", "float16",
        "--quantization", "awq",
        "--max-model-len", "14080",
        "--gpu-memory-utilization", "0.90",
        "--tensor-parallel-size", "1",
    ]


def test_engine_args_without_quantization(catalog):
    p = plan(node_of(RTX_4090), catalog, pinned_model="qwen2.5-7b")
    assert p.engine_args() == [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--dtype", "bfloat16", "--max-model-len", "32768",
        "--gpu-memory-utilization", "0.90", "--tensor-parallel-size", "1",
    ]


def test_to_dict_is_json(catalog):
    p = plan(node_of(RTX_16GB, RTX_16GB), catalog)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["model"] == "qwen2.5-32b"
    assert d["served_model_id"] == "Qwen/Qwen2.5-32B-Instruct-AWQ"
    assert d["tensor_parallel_size"] == 2 and d["gpu_indices"] == [0, 1]
    assert d["per_gpu_mib"]["budget"] == 14742.0
    assert d["per_gpu_mib"]["spare"] >= 0
    assert d["engine_args"] == p.engine_args()


def test_explain_shows_the_arithmetic(catalog):
    text = plan(node_of(RTX_4090), catalog).explain()
    lines = text.splitlines()
    assert len(lines) >= 6
    assert "23.99 GiB x 0.90 = 21.59 GiB" in text
    assert "32.50e9 params x 0.59 B = 17.86 GiB" in text
    assert "2 x 64 layers x 8 KV heads x 128 head_dim x 2 B = 256 KiB" in text
    assert "x 7424 tokens = 1.81 GiB" in text
    assert "17.86 + 1.89 + 1.81 = 21.56 GiB <= budget 21.59 GiB" in text


# ---------------------------------------------------------------- choices


def test_fp8_not_chosen_below_cc_8_9(catalog):
    # Same VRAM, Ada instead of Ampere: fp8 is then the best precision that fits.
    assert plan(node_of(RTX_4070), catalog).quantization.name == "fp8"
    p = plan(node_of(RTX_3060), catalog)
    assert p.quantization.name == "awq"
    with pytest.raises(PlanError) as e:
        plan(node_of(RTX_3060), catalog, pinned_model="qwen2.5-7b", pinned_quantization="fp8")
    assert "8.6" in str(e.value) and "fp8 needs cc >= 8.9" in str(e.value)


def test_higher_precision_preferred_for_same_model(catalog):
    p = plan(node_of(RTX_4090, RTX_4090), catalog)
    assert (p.model.name, p.quantization.name, p.tensor_parallel_size) == ("qwen2.5-32b", "fp8", 2)
    assert_fits(p)
    assert plan(node_of(RTX_4090), catalog, pinned_model="qwen2.5-7b").quantization.name == "bf16"


def test_bf16_needs_ampere_fp16_on_turing(catalog):
    turing = node(gpu(0, "NVIDIA GeForce RTX 2080 Ti", 11264, "7.5"))
    p = plan(turing, catalog, pinned_model="qwen2.5-3b")
    assert (p.quantization.name, p.quantization.dtype) == ("fp16", "float16")


def test_unhealthy_gpu_ignored(catalog):
    p = plan(node_of(RTX_16GB, RTX_16GB, unhealthy=(0,)), catalog)
    assert (p.model.name, p.quantization.name, p.tensor_parallel_size, p.gpu_indices) == (
        "qwen2.5-14b", "awq", 1, (1,))
    assert p.max_model_len == 19712
    assert_fits(p)


def test_tp_only_across_identical_gpus(catalog):
    # A 4060 beside a 4090: no TP group of the two; the 4090 alone serves.
    p = plan(node_of(RTX_4060, RTX_4090), catalog)
    assert (p.model.name, p.tensor_parallel_size, p.gpu_indices) == ("qwen2.5-32b", 1, (1,))


def test_tp_used_when_it_buys_context(catalog):
    two_4060 = node_of(RTX_4060, RTX_4060)
    p = plan(two_4060, catalog, pinned_model="qwen2.5-7b", pinned_quantization="awq")
    assert (p.tensor_parallel_size, p.max_model_len) == (2, 32768)  # one 4060 alone: 14080
    # Same context either way: the fewest GPUs.
    p = plan(node_of(RTX_16GB, RTX_16GB), catalog, pinned_model="qwen2.5-3b")
    assert (p.quantization.name, p.tensor_parallel_size, p.max_model_len) == ("bf16", 1, 32768)


def test_requested_max_model_len(catalog):
    # 32B fits a 4090 only up to 7424 tokens; asked for 16384 the planner steps down to 14B.
    p = plan(node_of(RTX_4090), catalog, max_model_len=16384)
    assert (p.model.name, p.quantization.name, p.max_model_len) == ("qwen2.5-14b", "fp8", 16384)
    assert_fits(p)
    with pytest.raises(PlanError, match="exceeds .*32768"):
        plan(node_of(RTX_4090), catalog, pinned_model="qwen2.5-7b", max_model_len=65536)


def test_cpu_only_refusal(catalog):
    with pytest.raises(CpuOnlyRefusal) as e:
        plan(Inventory(nvml_error="NVML Shared Library Not Found"), catalog)
    assert "CPU-only" in str(e.value) and "can serve no catalog model" in str(e.value)
    assert "NVML Shared Library Not Found" in str(e.value)
    with pytest.raises(CpuOnlyRefusal, match="GPU 0 .*Xid 79"):
        plan(node_of(RTX_4090, unhealthy=(0,)), catalog)


def test_unknown_compute_capability_fits_nothing(catalog):
    with pytest.raises(PlanError, match="no catalog model fits"):
        plan(node(gpu(0, "mystery", 24564, None)), catalog)


def test_too_small_gpu(catalog):
    with pytest.raises(PlanError) as e:
        plan(node(gpu(0, "NVIDIA GeForce GT 1030", 2048, "8.6")), catalog)
    msg = str(e.value)
    assert "no catalog model fits" in msg
    assert "qwen2.5-0.5b" in msg and "needs 2.01 GiB, has 1.80 GiB" in msg


# ---------------------------------------------------------------- pinned models


def test_pinned_model_that_fits(catalog):
    p = plan(node_of(RTX_4090), catalog, pinned_model="qwen2.5-3b")
    assert (p.model.name, p.quantization.name, p.max_model_len, p.tensor_parallel_size) == (
        "qwen2.5-3b", "bf16", 32768, 1)
    assert_fits(p)


def test_pinned_by_quantized_repo_id(catalog):
    p = plan(node_of(RTX_4090), catalog, pinned_model="Qwen/Qwen2.5-14B-Instruct-AWQ")
    assert (p.model.name, p.quantization.name) == ("qwen2.5-14b", "awq")
    with pytest.raises(PlanError, match="awq build"):
        plan(node_of(RTX_4090), catalog, pinned_model="Qwen/Qwen2.5-14B-Instruct-AWQ",
             pinned_quantization="fp8")


def test_pinned_model_that_does_not_fit(catalog):
    with pytest.raises(PlanError) as e:
        plan(node_of(RTX_4060), catalog, pinned_model="qwen2.5-32b")
    msg = str(e.value)
    assert "qwen2.5-32b" in msg and "does not fit" in msg
    assert "needs 20.75 GiB, has 7.20 GiB" in msg
    assert "would fit instead: qwen2.5-7b as awq" in msg and "max_model_len 14080" in msg


def test_pinned_unknown_model_or_quantization(catalog):
    with pytest.raises(PlanError, match="not in the catalog.*qwen2.5-7b"):
        plan(node_of(RTX_4090), catalog, pinned_model="meta-llama/Llama-3.1-405B")
    with pytest.raises(PlanError, match=r"offered: bf16, fp8, awq"):
        plan(node_of(RTX_4090), catalog, pinned_model="qwen2.5-14b", pinned_quantization="gptq")


def test_test_model_only_when_pinned(catalog, tmp_path):
    p = plan(node_of(RTX_4060), catalog, pinned_model="garage/tiny-llama-test")
    assert (p.model.name, p.quantization.name, p.max_model_len) == ("tiny-llama-test", "fp32", 2048)
    # A GPU too small for any real model: still never the test model.
    with pytest.raises(PlanError, match="no catalog model fits"):
        plan(node(gpu(0, "tiny", 1024, "8.9")), catalog)
    # A catalog of nothing but the test model: nothing to pick.
    text = CATALOG_PATH.read_text()
    only_tiny = tmp_path / "models.toml"
    only_tiny.write_text(text[text.index("[models.tiny-llama-test]"):])
    with pytest.raises(PlanError, match="no catalog model fits"):
        plan(node_of(RTX_4090), load_catalog(only_tiny))


# ---------------------------------------------------------------- corrupt catalogs

GOOD = """
[models.small]
id = "org/small"
parameters = 1_000_000_000
num_layers = 16
num_attention_heads = 16
num_kv_heads = 4
head_dim = 64
default_context_length = 8192
min_compute_capability = "7.5"

[models.small.quantizations.bf16]
bytes_per_param = 2.0
dtype = "bfloat16"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_good_small_catalog(tmp_path):
    cat = load_catalog(write(tmp_path, GOOD))
    (m,) = cat.models
    assert (m.name, m.id, m.num_layers, m.offered[0].bytes_per_param) == ("small", "org/small", 16, 2.0)


@pytest.mark.parametrize(
    "old, new, where, expected",
    [
        ("num_layers = 16\n", "", "'models.small.num_layers'", "is missing (a whole number"),
        ("num_layers = 16", 'num_layers = "16"', "'models.small.num_layers'", "must be a whole number, got a string"),
        ("num_layers = 16", "num_layers = 0", "'models.small.num_layers'", "must be greater than 0"),
        ('min_compute_capability = "7.5"', "min_compute_capability = 7.5", "'models.small.min_compute_capability'",
         'must be a string "major.minor" such as "8.9", got a number'),
        ("head_dim = 64", "head_dim = 64\nhead_dims = 64", "'models.small.head_dims'", "unknown key"),
        ("bytes_per_param = 2.0", 'bytes_per_param = "2"', "'models.small.quantizations.bf16.bytes_per_param'",
         "must be a number, got a string"),
        ("bytes_per_param = 2.0\n", "", "'models.small.quantizations.bf16.bytes_per_param'", "is missing"),
        ('dtype = "bfloat16"', 'dtype = "bf16"', "'models.small.quantizations.bf16.dtype'", "one of auto, half"),
        ('dtype = "bfloat16"', 'dtype = "bfloat16"\nquantisation = "fp8"',
         "'models.small.quantizations.bf16.quantisation'", "unknown key"),
        ("num_kv_heads = 4", "num_kv_heads = 5", "'models.small.num_kv_heads'", "divisor of num_attention_heads (16)"),
        ('id = "org/small"', 'id = "org/small"\ntest_only = "yes"', "'models.small.test_only'", "true or false"),
    ],
    ids=["missing", "string-for-int", "zero", "float-cc", "unknown-model-key", "quant-wrong-type",
         "quant-missing", "bad-dtype", "unknown-quant-key", "kv-heads", "bool"],
)
def test_corrupt_entry_names_file_model_and_key(tmp_path, old, new, where, expected):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as e:
        load_catalog(path)
    msg = str(e.value)
    assert str(path) in msg and where in msg and expected in msg
    assert "org/small" not in msg  # values are never echoed (the same validator reads secrets)


def test_quoted_model_name_in_error(catalog, tmp_path):
    text = CATALOG_PATH.read_text().replace("num_layers = 28\n", "", 1)
    path = write(tmp_path, text)
    with pytest.raises(CatalogError, match=r'models\."qwen2\.5-1\.5b"\.num_layers\' is missing'):
        load_catalog(path)


def test_bad_toml(tmp_path):
    path = write(tmp_path, GOOD.replace('dtype = "bfloat16"', 'dtype = "bfloat16'))
    with pytest.raises(CatalogError) as e:
        load_catalog(path)
    assert str(path) in str(e.value) and "not valid TOML" in str(e.value)
    assert "line 14" in str(e.value)


def test_not_a_table_and_empty(tmp_path):
    with pytest.raises(CatalogError, match=r"'models.small' must be a table \(\[models.small\]\), got a whole number"):
        load_catalog(write(tmp_path, "[models]\nsmall = 3\n"))
    with pytest.raises(CatalogError, match="unknown key 'model'"):
        load_catalog(write(tmp_path, "[model.small]\nid = 'x'\n"))
    no_quants = GOOD[: GOOD.index("[models.small.quantizations")]
    with pytest.raises(CatalogError, match=r"'models.small.quantizations' is missing"):
        load_catalog(write(tmp_path, no_quants))


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "nope.toml")


def test_the_agents_own_plan_on_unequal_gpus_is_a_pipeline_with_its_layer_split(tmp_path):
    """An RTX 4070 + 4060 PC planning for itself (no head) serves 14B AWQ over both GPUs; its
    container gets the layer split, without which vLLM splits evenly and overfills the 4060."""
    from garage_node.node.config import EngineSection
    from garage_node.node.engine.spec import desired_spec

    inv = node_of(RTX_4070, RTX_4060)
    cfg = EngineSection(catalog=str(CATALOG_PATH), image="vllm/vllm-openai:v0.32.0", gpu_access="nvidia-toolkit")
    spec, why = desired_spec(cfg, inv, "100.96.0.2")
    body = spec.container_body({})
    assert "VLLM_PP_LAYER_PARTITION=30,18" in body["Env"]
    cmd = body["Cmd"]
    assert cmd[cmd.index("--pipeline-parallel-size") + 1] == "2" and cmd[cmd.index("--tensor-parallel-size") + 1] == "1"
    assert spec.gpu_ids == ("0", "1") and "Qwen2.5-14B" in why
