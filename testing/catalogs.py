"""Catalog entries for tests: the tiny test model (configs/models.toml's tiny-llama-test) under
other names, as the placement tests need two or three distinct models a CPU PC may serve."""

from __future__ import annotations


def tiny_entries(*names: str, id_prefix: str = "") -> str:
    """TOML of one `cpu = true` tiny model per name, served as `id_prefix + name`."""
    return "".join(f"""
[models.{name}]
id = "{id_prefix}{name}"
test_only = true
cpu = true
parameters = 4_200_000
num_layers = 2
num_attention_heads = 4
num_kv_heads = 4
head_dim = 16
default_context_length = 2048
min_compute_capability = "7.5"

[models.{name}.quantizations.fp32]
bytes_per_param = 4.0
dtype = "float32"
""" for name in names)
