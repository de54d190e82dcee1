"""Tiny random-weight models of several architectures, built from configs (never downloaded).

``build(family)`` returns ``(hf_model, tokenizer)``: 2 layers, d_model 64, a byte-level vocabulary
of 256 tokens (ids 0-3 are special: unk, BOS, EOS, pad), dropout 0, fixed seed. The tokenizer is
saved to a temporary folder and read back, as TransformerLens reloads tokenizers by path.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

FAMILIES = ("llama", "gpt2", "qwen2", "gemma2", "olmo", "gpt_neox", "olmo2", "qwen3", "mistral")
VOCAB = 256


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {bytes([i]).decode("latin-1"): i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="\x00"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="\x01", eos_token="\x02", unk_token="\x00", pad_token="\x03")
    d = Path(tempfile.mkdtemp(prefix="sonde-tinytok-"))
    tok.save_pretrained(d)
    return str(d)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def config(family: str):
    import transformers as T

    arch = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "olmo": "OlmoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3, architectures=[arch])
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gemma2":
        return T.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16, **common)
    if family == "olmo":
        return T.OlmoConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=128, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0, **common)
    if family == "olmo2":  # q/k RMSNorm over all heads, norms after each branch (no pre-norms)
        return T.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "qwen3":  # per-head q/k RMSNorm; head_dim 32 is not hidden_size / heads, as in Qwen3 checkpoints
        return T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, max_position_embeddings=128, **common)
    if family == "mistral":  # sliding-window attention, shorter than the test prompts
        return T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, **common)
    raise KeyError(family)


def build(family: str, seed: int = 0):
    """``(model, tokenizer)`` for a tiny random model of ``family`` (float32, eval mode, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32).eval()
    if family == "gpt2":  # GPT-2's init leaves biases at 0; give them values so bias handling is tested
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.02)
    return model, tokenizer()


def probe(family: str, backend: str = "nnsight", seed: int = 0):
    """A probe around a fresh tiny model."""
    from probes import from_hf

    model, tok = build(family, seed)
    return from_hf(model, tok, backend=backend, name=f"tiny-{family}")
