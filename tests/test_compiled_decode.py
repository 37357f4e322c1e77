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
    # the logits of a compiled step equal the full forward
    ids = torch.tensor([prompts[0] + eager_one[:5]])
    with torch.no_grad(), decode_kernels(model):
        full = model(ids)
        cache = model.new_cache(1, 16)
        model(ids[:, :6], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(6, 11)]
    assert (torch.cat(steps, 1) - full[:, 6:]).abs().max() <= 1e-4
    # leaving the context restores the model
    assert model.compiled_step is None
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, nn.Linear))
