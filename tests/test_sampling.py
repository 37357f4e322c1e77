"""Sampling against transformers' logits processors, seeded sampling against transformers' generate."""
import pytest
import torch
import transformers
from transformers.generation import logits_process as lp

import lmlab
from lmlab.inference.sampling import SamplingParams, apply_repetition_penalty, filter_logits


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05)])
def test_filters_match_transformers(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ref = logits.clone()
    if top_k:
        ref = lp.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = lp.TopPLogitsWarper(top_p)(None, ref)
    got = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[~torch.isinf(got)], ref[~torch.isinf(ref)])
    assert (~torch.isinf(got)).sum(dim=1).min() >= 1


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    context = torch.tensor([[1, 5, 5, 9], [-1, -1, 3, 29]])  # -1: padding
    ref0 = lp.RepetitionPenaltyLogitsProcessor(1.3)(context[:1], logits[:1].clone())
    ref1 = lp.RepetitionPenaltyLogitsProcessor(1.3)(context[1:, 2:], logits[1:].clone())
    got = apply_repetition_penalty(logits, context, 1.3)
    assert torch.allclose(got, torch.cat([ref0, ref1]))
    assert not torch.allclose(got, logits)


@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_k=20), dict(temperature=1.3, top_p=0.9),
                                dict(temperature=0.7, top_k=0, repetition_penalty=1.5)])
def test_seeded_sampling_matches_transformers(kw, hf_dirs):
    """Same seed, same settings: the same tokens as transformers' generate(do_sample=True)."""
    d = hf_dirs("llama-gqa-untied")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    model = lmlab.load_model(d)
    prompt = [3, 14, 15, 92, 65]
    torch.manual_seed(1234)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long), do_sample=True,
                          max_new_tokens=20, eos_token_id=None, pad_token_id=0, top_k=kw.get("top_k", 0),
                          top_p=kw.get("top_p", 1.0), temperature=kw["temperature"],
                          repetition_penalty=kw.get("repetition_penalty", 1.0))[0, 5:].tolist()
    got = lmlab.generate(model, prompt, max_new_tokens=20, seed=1234, stop_token_ids=[], **kw)
    assert got == ref
    assert got != lmlab.generate(model, prompt, max_new_tokens=20, seed=4321, stop_token_ids=[], **kw)


def test_stops_at_eos_and_streams(hf_dirs):
    model = lmlab.load_model(hf_dirs("llama"))
    prompt = [3, 14, 15]
    free = lmlab.generate(model, prompt, max_new_tokens=10, stop_token_ids=[])
    stop = free[4]
    out = lmlab.generate(model, prompt, max_new_tokens=10, stop_token_ids=[stop])
    assert out == free[: free.index(stop) + 1]  # the stop token is emitted, then nothing
    assert list(lmlab.stream(model, prompt, max_new_tokens=10, stop_token_ids=[stop])) == out
    # default stop ids come from the config's eos_token_id
    eos_model = lmlab.load_model(hf_dirs("llama"))
    eos_model.config.eos_token_id = stop
    assert lmlab.generate(eos_model, prompt, max_new_tokens=10) == out


def test_batch_rows_stop_independently(hf_dirs):
    model = lmlab.load_model(hf_dirs("llama"))
    prompts = [[3, 14, 15], [9, 2 + 20, 6, 5]]
    free = lmlab.generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    stop = free[0][2]
    out = lmlab.generate(model, prompts, max_new_tokens=8, stop_token_ids=[stop])
    for f, o in zip(free, out):
        assert o == (f[: f.index(stop) + 1] if stop in f else f)


def test_invalid_sampling_arguments(hf_dirs):
    model = lmlab.load_model(hf_dirs("llama"))
    for bad, msg in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                     (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0), "repetition")]:
        with pytest.raises(ValueError, match=msg):
            lmlab.generate(model, [1, 2], **bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lmlab.generate(model, [1, 500])
    with pytest.raises(ValueError, match="at least one token"):
        lmlab.generate(model, [])
    gpt2 = lmlab.load_model(hf_dirs("gpt2"))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        lmlab.generate(gpt2, [1] * 60, max_new_tokens=10)
    assert SamplingParams().temperature == 0.0
