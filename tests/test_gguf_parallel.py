"""GGUF export of the parallel-block decoders, run by llama.cpp: GPT-NeoX ("gptneox"), Falcon ("falcon") and
Cohere / palm-tiny ("command-r"). Same checks as tests/test_gguf.py: last-position logits of the f32 export
match lmlab's forward and greedy decoding is identical."""
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import spread_weights
from test_gguf import TEXTS, _greedy, _llama

import lmlab
from lmlab.config import preset
from lmlab.interop.gguf import GGUFError, export_gguf, read_gguf

pytest.importorskip("llama_cpp")

_B = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
# case -> (transformers class prefix, config kwargs); "palm-tiny" is lmlab's preset, saved by lmlab
CASES = {
    "neox-parallel": ("GPTNeoX", dict(_B, intermediate_size=96, rotary_pct=0.5)),
    "neox-sequential": ("GPTNeoX", dict(_B, intermediate_size=96, rotary_pct=0.25, use_parallel_residual=False,
                                        attention_bias=False, tie_word_embeddings=True)),
    "falcon-multi-query": ("Falcon", dict(_B, ffn_hidden_size=96)),
    "falcon-gqa": ("Falcon", dict(_B, ffn_hidden_size=96, new_decoder_architecture=True, num_kv_heads=2)),
    "cohere": ("Cohere", dict(_B, intermediate_size=96, num_key_value_heads=2, logit_scale=0.25)),
    "palm-tiny": None,
}


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.data.world import make_world
    from lmlab.tokenizer import Tokenizer
    return Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind="bpe",
                           show_progress=False)


def model_dir(case, tok, path):
    """A saved random model of `case` with `tok` (3 spare embedding rows, as lmlab's trained tokenizers have)."""
    ids = dict(vocab_size=tok.vocab_size + 3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if CASES[case] is None:
            torch.manual_seed(0)
            model = lmlab.build(preset("palm-tiny", **ids, num_hidden_layers=2, max_position_embeddings=256))
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.1).add_(1.0 if p.dim() == 1 else 0.0)  # the only 1-D weights are LayerNorm gains
        else:
            prefix, kw = CASES[case]
            torch.manual_seed(0)
            cfg = getattr(transformers, f"{prefix}Config")(**kw, **ids)
            model = spread_weights(getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval())
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_runs_the_f32_export(case, tokenizer, tmp_path):
    d = model_dir(case, tokenizer, tmp_path / "model")
    model = lmlab.load_model(d)
    path = export_gguf(d, tmp_path / "m.gguf", dtype="f32")
    llm = _llama(path)
    ids = tokenizer.encode(TEXTS[0])
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1].numpy()
    scale = np.abs(ours).max()
    assert scale > 1.0
    # ggml's CPU GELU reads an f16 table (GPT-NeoX, Falcon), as for GPT-2 in test_gguf.py
    assert np.abs(theirs - ours).max() <= 1e-3 * scale, (np.abs(theirs - ours).max(), scale)
    new = lmlab.generate(model, ids, max_new_tokens=32, temperature=0.0)
    assert _greedy(llm, ids, 32, tokenizer.eos_token_id) == new
    assert len(new) >= 8


def test_export_metadata(tokenizer, tmp_path):
    meta, tensors = read_gguf(export_gguf(model_dir("neox-parallel", tokenizer, tmp_path / "m"), tmp_path / "n.gguf"))
    assert meta["general.architecture"] == "gptneox"
    assert meta["gptneox.rope.dimension_count"] == 8  # half of each 16-dim head
    assert meta["gptneox.use_parallel_residual"] is True or meta["gptneox.use_parallel_residual"] == 1
    assert tensors["blk.0.attn_qkv.weight"].shape == (3 * 64, 64)


def test_llamacpp_limits_are_refused(tokenizer, tmp_path):
    """llama.cpp's Falcon is parallel and bias-free: a sequential or biased Falcon is refused by name."""
    CASES["falcon-sequential"] = ("Falcon", dict(_B, ffn_hidden_size=96, parallel_attn=False))
    try:
        d = model_dir("falcon-sequential", tokenizer, tmp_path / "m")
    finally:
        del CASES["falcon-sequential"]
    with pytest.raises(GGUFError, match="sequential"):
        export_gguf(d, tmp_path / "x.gguf")
