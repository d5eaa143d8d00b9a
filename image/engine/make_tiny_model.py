#!/usr/bin/env python3
"""Write a tiny Llama model directory for vLLM with `--load-format dummy` (no weights).

    make_tiny_model.py OUTDIR [--vocab-size 1024]

Writes config.json (LlamaForCausalLM: hidden 128, 2 layers, 4 heads / 2 KV heads, head_dim 32,
the smallest head size vLLM's CPU attention supports), generation_config.json, and a byte-level
BPE tokenizer trained here on built-in text (tokenizer.json + tokenizer_config.json with a simple
chat template). Nothing is downloaded. Output is deterministic for a given `tokenizers` version.

Needs only the `tokenizers` package, which the vLLM image has:

    docker run --rm --entrypoint python3 -v "$OUT:/model" garage-node/vllm-cpu:test \
        /opt/garage/make_tiny_model.py /model
"""

import argparse
import json
import os
import sys

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEXT = """\
A gaming PC boots from a USB stick and joins the regional GPU network by itself.
The agent reconciles desired state with actual state, again and again, like a kubelet.
It reads the GPUs and their memory, starts a WireGuard interface, a Ray worker and an engine.
The engine is a vLLM server in a container that answers OpenAI compatible requests.
Hello! How are you today? I am fine, thank you. What is the weather like in the city?
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time there was a small model that knew very little but answered quickly.
user assistant system: please write a short poem about graphics cards and the night sky.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096 8192.
Code: def main(): return {"status": "ok", "tokens": [1, 2, 3]} # comment
"""

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has been if more when will "
    "would who so no node head token model engine request response stream health metrics queue "
    "memory card graphics driver kernel network overlay peer region cluster worker process "
    "container image disk partition boot config status drain heartbeat enroll join secret"
).split()


def corpus():
    yield from TEXT.splitlines()
    # Deterministic synthetic sentences for a few hundred merges more.
    n = len(WORDS)
    for i in range(600):
        yield " ".join(WORDS[(i * k * 7 + k) % n] for k in range(1, 12)).capitalize() + "."
    # Made-up words from syllables, so that the trainer finds enough merges for the vocab size.
    syl = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    m = len(syl)
    for i in range(400):
        yield " ".join(
            syl[(i * 31 + k * 17) % m] + syl[(i * 7 + k * 3) % m] + syl[(i + k * 11) % m][:1 + k % 2]
            for k in range(10)
        )


def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)

    tok = train_tokenizer(args.vocab_size)
    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    assert ids == {UNK: 0, BOS: 1, EOS: 2, PAD: 3}, ids

    os.makedirs(args.outdir, exist_ok=True)
    out = lambda name: os.path.join(args.outdir, name)  # noqa: E731
    tok.save(out("tokenizer.json"))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": "float32",
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    gen_config = {
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    for name, obj in (
        ("config.json", config),
        ("tokenizer_config.json", tok_config),
        ("generation_config.json", gen_config),
        ("special_tokens_map.json", special_map),
    ):
        with open(out(name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    print(f"tiny llama written to {args.outdir} (vocab {vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
