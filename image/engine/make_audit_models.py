#!/usr/bin/env python3
"""Write tiny Llama models with REAL (trained) weights, for the audit tests and bench (issue #20).

    make_audit_models.py OUTDIR [--steps 300]

The dummy-weight model of make_tiny_model.py gives near-uniform next-token distributions: an
audit that re-scores a PC's tokens cannot tell anything apart on it. These models are the same
config and tokenizer family (make_tiny_model.py's), trained for 300 steps (about a minute on 2 cores) on the
built-in corpus, so their distributions are peaked like a real model's. Written, each a vLLM
model directory (config, tokenizer, model.safetensors, float32):

    OUTDIR/honest     seed 0: what the region serves under the model's name
    OUTDIR/other      seed 1 (other initialisation and data order): another model, same name
    OUTDIR/q3         honest rounded to 3 bits (per-row absmax, symmetric): a much harder quantization
    OUTDIR/q4         honest rounded to 4 bits the same way
    OUTDIR/q8         honest rounded to 8 bits the same way (a milder one, to measure the limit)
    OUTDIR/layer      honest with one layer's MLP down-projection scaled by 1.1 ("changed a little")

Deterministic for a given image (torch and tokenizers versions; 2 threads, fixed seeds). Runs in
the vLLM CPU image (it has torch, transformers, safetensors); nothing is downloaded:

    docker run --rm --network none --entrypoint /opt/venv/bin/python \\
        -v "$PWD/image/engine:/src:ro" -v "$OUT:/out" garage-node/vllm-cpu:test \\
        /src/make_audit_models.py /out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_model as tiny  # noqa: E402  (same directory; config and tokenizer family)

SEQ = 64
BATCH = 32


def documents():
    """Training text: the tokenizer's corpus as plain text, and as chat turns (user says one
    line, the assistant answers with the next), so chat and text completions are both peaked."""
    lines = [line for line in tiny.corpus() if line.strip()]
    for i, line in enumerate(lines):
        yield line + tiny.EOS
        nxt = lines[(i + 1) % len(lines)]
        yield (f"<|user|>\n{line}{tiny.EOS}\n<|assistant|>\n{nxt}{tiny.EOS}\n")


def token_stream(tok):
    ids: list[int] = []
    for doc in documents():
        ids.extend(tok.encode(doc).ids)  # the post-processor puts BOS first, as vLLM's /tokenize does
    return ids


def train(config: dict, ids: list[int], seed: int, steps: int, log) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    data = torch.tensor(ids, dtype=torch.long)
    n_windows = (len(data) - 1) // SEQ
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, n_windows, (BATCH,), generator=gen) * SEQ
        starts += torch.randint(0, SEQ, (BATCH,), generator=gen)
        starts.clamp_(max=len(data) - SEQ - 1)
        batch = torch.stack([data[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"seed {seed} step {step} loss {loss.item():.3f}")
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def fake_quant(weights: dict, bits: int) -> dict:
    """Round every 2-D weight to `bits` bits per output row (symmetric absmax), back in float32:
    what a PC serving a harder quantization computes with."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    out = {}
    for k, w in weights.items():
        if w.dim() == 2:
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
            w = (torch.round(w / scale).clamp(-qmax, qmax) * scale).to(w.dtype)
        out[k] = w.contiguous()
    return out


def one_layer_changed(weights: dict, factor: float = 1.1) -> dict:
    out = dict(weights)
    key = "model.layers.1.mlp.down_proj.weight"
    out[key] = (weights[key] * factor).contiguous()
    return out


def write_model(outdir: str, base: str, weights: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(outdir, exist_ok=True)
    for name in os.listdir(base):
        shutil.copy(os.path.join(base, name), os.path.join(outdir, name))
    path = os.path.join(outdir, "model.safetensors")
    save_file(weights, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # shared read-only by every engine container


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)  # fixed, so float sums are the same wherever it runs
    torch.use_deterministic_algorithms(True)
    t0 = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    base = os.path.join(args.outdir, ".base")
    tiny.main([base])  # config.json, tokenizer, generation config: the tiny model's family
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    from tokenizers import Tokenizer

    ids = token_stream(Tokenizer.from_file(os.path.join(base, "tokenizer.json")))
    log(f"{len(ids)} training tokens")

    honest = train(config, ids, seed=0, steps=args.steps, log=log)
    other = train(config, ids, seed=1, steps=args.steps, log=log)
    for name, weights in (
        ("honest", honest),
        ("other", other),
        ("q3", fake_quant(honest, 3)),
        ("q4", fake_quant(honest, 4)),
        ("q8", fake_quant(honest, 8)),
        ("layer", one_layer_changed(honest)),
    ):
        write_model(os.path.join(args.outdir, name), base, weights)
    shutil.rmtree(base)
    log(f"models written to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
