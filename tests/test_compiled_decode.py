"""The compiled decode step (inference/kernels.py) gives the same tokens and logits as eager decoding."""
import pytest
import torch
import torch.nn as nn

import lmlab
from lmlab.inference.kernels import decode_kernels, matvec


def test_matvec_matches_linear():
    torch.manual_seed(0)
    w, x = torch.randn(300, 70), torch.randn(70)
    assert torch.allclose(matvec(x, w), w @ x, atol=1e-5)


@pytest.mark.parametrize("case", ["qwen2-window", "mixtral", "llama-gqa-untied", "gpt2-inverse-layer-scale", "mistral-window"])
def test_compiled_decode_matches_eager(case, hf_dirs):
    model = lmlab.load_model(hf_dirs(case))
    prompts = [[5, 17, 33, 8, 61, 9], [40, 3]]
    eager_one = lmlab.generate(model, prompts[0], max_new_tokens=12, stop_token_ids=[])
    eager_two = lmlab.generate(model, prompts, max_new_tokens=12, stop_token_ids=[])
    assert lmlab.generate(model, prompts[0], max_new_tokens=12, stop_token_ids=[], compile=True) == eager_one
    assert lmlab.generate(model, prompts, max_new_tokens=12, stop_token_ids=[], compile=True) == eager_two
    # a one-token prompt: the compiled path prefills nothing before its first step (alone, and padded in a batch)
    for short in ([[61]], [[61], [5, 17, 33]]):
        assert (lmlab.generate(model, short, max_new_tokens=6, stop_token_ids=[], compile=True)
                == lmlab.generate(model, short, max_new_tokens=6, stop_token_ids=[]))
    # the logits of a compiled step equal the full forward
    ids = torch.tensor([prompts[0] + eager_one[:5]])
    with torch.no_grad(), decode_kernels(model) as step:
        full = model(ids)
        cache = model.new_cache(1, 11)
        model(ids[:, :6], cache=cache)
        steps = [step(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(6, 11)]  # each (1, vocab)
        assert cache.length == 11
        with pytest.raises(ValueError, match="KV cache holds 11 positions; 12 needed"):
            step(ids[:, :1], torch.tensor([[11]]), cache)
    assert (torch.stack(steps, 1) - full[:, 6:]).abs().max() <= 1e-4
    # leaving the context restores the model
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, nn.Linear))
