"""Shared fixtures: tiny random transformers models saved with save_pretrained (nothing is downloaded)."""
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

# name -> (transformers config class name, kwargs). Sizes are tiny; each case exercises one feature.
_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
HF_CASES = {
    "llama": ("LlamaConfig", dict(_BASE, num_key_value_heads=4)),
    "llama-gqa-untied": ("LlamaConfig", dict(_BASE, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied-bias": ("LlamaConfig", dict(_BASE, num_key_value_heads=1, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True, head_dim=32)),
    "llama3-rope": ("LlamaConfig", dict(_BASE, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "yarn-rope": ("LlamaConfig", dict(_BASE, num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "linear-rope": ("LlamaConfig", dict(_BASE, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "dynamic-rope": ("LlamaConfig", dict(_BASE, max_position_embeddings=8,
                                         rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral-window": ("MistralConfig", dict(_BASE, num_key_value_heads=2, sliding_window=4)),
    "mixtral": ("MixtralConfig", dict(_BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2Config", dict(_BASE, num_key_value_heads=2, num_hidden_layers=3, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=1)),
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                eos_token_id=2)),
    "gpt2-inverse-layer-scale": ("GPT2Config", dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                    scale_attn_by_inverse_layer_idx=True, activation_function="gelu")),
}
HF_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
              "MixtralConfig": "MixtralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM", "GPT2Config": "GPT2LMHeadModel"}


def make_hf_model(case: str, seed: int = 0):
    """A random transformers model for `case`, with weights spread enough that differences show."""
    import transformers
    cfg_name, kw = HF_CASES[case]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    return spread_weights(getattr(transformers, HF_CLASSES[cfg_name])(cfg).eval())


def spread_weights(model):
    """Default init gives near-zero logits (a random model then answers every prompt alike); spread the
    weights so that outputs depend on the input and layout errors show. Norm gains stay near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name or "ln_" in name else 0.0)
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """case -> directory of a saved tiny transformers model (built lazily, once per session)."""
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp(case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make_hf_model(case).save_pretrained(d)
            cache[case] = d
        return cache[case]
    return get
