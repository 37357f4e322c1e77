"""Decoder families against transformers: logits both ways, cached decoding, greedy generation, MoE loss."""
import warnings

import pytest
import torch
import transformers
from conftest import HF_CASES

import lmlab
from lmlab.interop.hf import config_from_hf, read_config

CASES = sorted(HF_CASES)
TOL = 1e-4


def length(case, default):
    """Dynamic NTK re-derives its frequencies from the longest position in a call (and transformers
    keeps the longest seen), so comparisons that mix lengths stay within max_position_embeddings (8)."""
    return 8 if case == "dynamic-rope" else default


def hf_logits(hf, ids, mask=None, pos=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    cache = {}

    def get(case):
        # transformers' dynamic NTK keeps the frequencies of the longest sequence it has seen: use a fresh copy
        if case not in cache or case == "dynamic-rope":
            d = hf_dirs(case)
            cache[case] = (transformers.AutoModelForCausalLM.from_pretrained(d).eval(), lmlab.load_model(d))
        return cache[case]
    return get


@pytest.mark.parametrize("case", CASES)
def test_hf_to_lmlab_logits(case, loaded):
    hf, ours = loaded(case)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        diff = (hf_logits(hf, ids) - ours(ids)).abs().max().item()
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch(case, loaded):
    """A left-padded batch gives transformers' logits on real tokens, and each row matches its unpadded self."""
    hf, ours = loaded(case)
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (3, length(case, 10)))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_logits(hf, ids, mask, pos)
        got = ours(ids, attention_mask=mask)
        real = mask.bool()
        assert (ref[real] - got[real]).abs().max().item() <= TOL
        assert torch.isfinite(got).all(), "padded query rows must not produce NaN"
        alone = ours(ids[1:2, 4:])  # row 1 without its padding
        assert (alone[0] - got[1, 4:]).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_lmlab_to_hf_logits(case, hf_dirs, tmp_path):
    """An lmlab model saved with save_pretrained loads in transformers with the same logits."""
    cfg = config_from_hf(read_config(hf_dirs(case)))
    torch.manual_seed(3)
    ours = lmlab.build(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == read_config(hf_dirs(case))["architectures"][0]
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        diff = (hf_logits(hf, ids) - ours(ids)).abs().max().item()
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_matches_full_forward(case, loaded):
    """Prefill 3 tokens, then decode one at a time with the KV cache (past Mistral's window of 4)."""
    _, ours = loaded(case)
    T = length(case, 14)
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, T)
        steps = [ours(ids[:, :3], cache=cache)]
        for t in range(3, T):
            steps.append(ours(ids[:, t:t + 1], cache=cache))
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= TOL, f"{case}: cached vs full diff {diff}"


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, loaded):
    hf, ours = loaded(case)
    prompt, n = [5, 17, 33, 8, 61], length(case, 17) - 5
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert lmlab.generate(ours, prompt, max_new_tokens=n, stop_token_ids=[]) == ref


@pytest.mark.parametrize("case", ["llama-gqa-untied", "mistral-window", "gpt2"])
def test_batched_generation_matches_single(case, loaded):
    """Prompts of different lengths decoded together give what each gives alone (and what transformers gives)."""
    hf, ours = loaded(case)
    prompts = [[5, 17, 33, 8, 61, 9], [40, 2 + 1], [7, 7, 90, 11]]
    batched = lmlab.generate(ours, prompts, max_new_tokens=8, stop_token_ids=[])
    assert batched == [lmlab.generate(ours, p, max_new_tokens=8, stop_token_ids=[]) for p in prompts]
    for p, got in zip(prompts, batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()


def test_sliding_window_is_applied(loaded):
    """The window changes logits past it (so the Mistral parity above tests a real window)."""
    _, ours = loaded("mistral-window")
    ids = torch.randint(0, 97, (1, 12))
    no_window = lmlab.build(ours.config.replace(sliding_window=None)).eval()
    no_window.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(ids), no_window(ids)
    assert (a[:, :4] - b[:, :4]).abs().max() <= TOL  # inside the window: identical
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_mixtral_router_aux_loss_matches_transformers(loaded):
    hf, ours = loaded("mixtral")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True).aux_loss
        ours(ids)
        got = ours.aux_loss()
    assert abs(ref.item() - got.item()) <= 1e-5
    assert got.item() > 0


def test_moe_skips_experts_without_tokens(loaded):
    """An expert the router never picks is never computed: poisoning its weights changes nothing."""
    _, ours = loaded("mixtral")
    model = lmlab.build(ours.config).eval()
    model.load_state_dict(ours.state_dict())

    class NeverPick3(torch.nn.Module):
        def __init__(self, router):
            super().__init__()
            self.router = router

        def forward(self, x):
            logits = self.router(x).clone()
            logits[:, 3] = -1e9
            return logits

    for block in model.layers:
        block.mlp.router = NeverPick3(block.mlp.router)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        clean = model(ids)
        for block in model.layers:
            block.mlp.w_gate[3] = float("nan")
            block.mlp.w_down[3] = float("nan")
        poisoned = model(ids)
        for block in model.layers:  # and the poison does show when the expert is used
            block.mlp.router = block.mlp.router.router
        used = model(ids)
    assert torch.equal(poisoned, clean)
    assert not torch.isfinite(used).all()


def test_mixtral_file_layout_is_per_expert(hf_dirs):
    from safetensors import safe_open
    with safe_open(str(hf_dirs("mixtral") / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
