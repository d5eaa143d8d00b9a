"""How fast a PC decodes a model, roughly: generating a token reads every weight once, so a GPU's
tokens/s for a model goes as its memory bandwidth over the model's bytes. The placer weighs PCs by
it (a model on ten RTX 4090s has about three times the capacity of one on ten RTX 4060s); the
absolute number does not matter, only the ratios.

Bandwidths are the makers' published figures (GB/s) for the cards gaming PCs carry; a card not
listed is estimated from its memory size (the median ratio of the cards listed, ~40 GB/s per GB).
"""

from __future__ import annotations

import functools

from garage_node.core.wire import GPU

# Longest names first where one contains another ("4060 Ti" before "4060").
_GBS: tuple[tuple[str, float], ...] = (
    ("RTX 5090", 1792), ("RTX 5080", 960), ("RTX 5070 Ti", 896), ("RTX 5070", 672),
    ("RTX 5060 Ti", 448), ("RTX 5060", 448),
    ("RTX 4090", 1008), ("RTX 4080 SUPER", 736), ("RTX 4080", 717), ("RTX 4070 Ti SUPER", 672),
    ("RTX 4070 Ti", 504), ("RTX 4070 SUPER", 504), ("RTX 4070", 504), ("RTX 4060 Ti", 288), ("RTX 4060", 272),
    ("RTX 3090 Ti", 1008), ("RTX 3090", 936), ("RTX 3080 Ti", 912), ("RTX 3080", 760), ("RTX 3070 Ti", 608),
    ("RTX 3070", 448), ("RTX 3060 Ti", 448), ("RTX 3060", 360),
    ("RTX 2080 Ti", 616), ("RTX 2080 SUPER", 496), ("RTX 2080", 448), ("RTX 2070", 448), ("RTX 2060", 336),
    ("TITAN RTX", 672), ("RTX A6000", 768), ("RTX A5000", 768), ("RTX A4000", 448),
    ("L40S", 864), ("L4", 300), ("A100", 1935), ("H100", 3350), ("H200", 4800),
)
GBS_PER_GIB_UNLISTED = 40.0
# vLLM's CPU build (tests): DDR4/DDR5 dual channel, ~50 GB/s.
CPU_GBS = 50.0


@functools.lru_cache(maxsize=256)
def _by_name(name: str, memory_mib: int) -> float:
    for key, gbs in _GBS:
        if key.lower() in name.lower():
            return gbs
    return GBS_PER_GIB_UNLISTED * memory_mib / 1024


def gbs(gpu: GPU) -> float:
    """Memory bandwidth of a GPU in GB/s, published or estimated."""
    return _by_name(gpu.name, gpu.memory_total_mib)


def tokens_per_s(gpus: tuple[GPU, ...], weights_gb: float, layer_partition: tuple[int, ...] = ()) -> float:
    """Relative decode rate of a model of `weights_gb` on these GPUs: tensor parallel reads the
    weights at the GPUs' summed bandwidth; a pipeline runs at the pace of its slowest stage (each
    stage reads its share of the layers); no GPU: the CPU build."""
    if not gpus:
        return CPU_GBS / weights_gb
    if layer_partition:
        total = sum(layer_partition)
        return 1 / max((weights_gb * n / total) / gbs(g) for g, n in zip(gpus, layer_partition, strict=True))
    return sum(gbs(g) for g in gpus) / weights_gb
