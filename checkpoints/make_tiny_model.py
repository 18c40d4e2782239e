"""Make tiny random Hugging Face models (Llama, Mistral, Qwen2, Qwen3) for tests, offline.

Each model is a real transformers checkpoint (config.json + model.safetensors) with a byte-level
BPE tokenizer trained here on a small built-in text and a ChatML chat template, so tests compare
our engine with transformers on identical weights without any download. Weights are drawn with a
larger spread than transformers' default init so that greedy argmaxes are not near-ties.

    python checkpoints/make_tiny_model.py OUT_DIR [--arch llama] [--variant gqa]
"""

from __future__ import annotations

import argparse
import json
import os

_CORPUS = """The quick brown fox jumps over the lazy dog. A paged cache keeps keys and values.
Once upon a time there was a small model that liked to count: one two three four five six.
Bonjour, ça va? Très bien, merci. 日本語のテキストも少し。Emoji too: 🙂🚀. Numbers 0123456789.
def main():\n    print("hello world")\n    return 42\n
The capital of France is Paris. The capital of Italy is Rome. Water boils at 100 degrees.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# name -> (architecture, config overrides); all share hidden 64, 2 layers, vocab 384
VARIANTS = {
    "llama-gqa": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa-tied": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1,
                                                tie_word_embeddings=True)),
    "llama-headdim": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=32)),
    "llama3-rope": ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                           sliding_window=16)),
    "qwen2": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    "llama-h8-kv4": ("LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4)),
    "llama-h12-kv3": ("LlamaForCausalLM", dict(num_attention_heads=12, num_key_value_heads=3,
                                               hidden_size=96, head_dim=16)),
    "qwen3": ("Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=False)),
}


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on the built-in corpus, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: str, variant: str = "llama-gqa", seed: int = 0,
                    dtype: str = "float32") -> str:
    """Write a tiny random model of `variant` into out_dir; returns out_dir."""
    import torch
    import transformers

    arch, overrides = VARIANTS[variant]
    tokenizer = train_tokenizer()
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                  tie_word_embeddings=False, architectures=[arch])
    fields.update(overrides)
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so bugs show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "jaxserve_tiny.json"), "w") as f:
        json.dump({"variant": variant, "seed": seed}, f)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", default="llama-gqa", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(make_tiny_model(args.out_dir, args.variant, args.seed, args.dtype))


if __name__ == "__main__":
    main()
