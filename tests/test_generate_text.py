"""Text in, text out: generate/stream with a tokenizer, chat messages, and the command line."""
import json
import subprocess
import sys

import pytest
import torch

import lmlab
from lmlab.chat import encode_chat, stop_token_ids
from lmlab.tokenizer import Tokenizer

CORPUS = ["The cat sat on the mat. The dog sat on the log. Llamas 🦙 eat grass; café crème is nice."] * 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a trained byte-level BPE tokenizer, saved together as one directory."""
    tok = Tokenizer.train(CORPUS, 400, kind="bpe", show_progress=False)
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model = lmlab.build(cfg).eval()
    d = tmp_path_factory.mktemp("textmodel")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_text_generation_matches_ids(model_dir):
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    new = lmlab.generate(model, tok.encode("The cat"), max_new_tokens=12)
    assert lmlab.generate(model, tok, "The cat", max_new_tokens=12) == tok.decode(new, skip_special_tokens=True)
    assert "".join(lmlab.stream(model, tok, "The cat", max_new_tokens=12)) == tok.decode(new, skip_special_tokens=True)


def test_chat_messages_use_the_template_and_stop_tokens(model_dir):
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    assert tok.chat_template  # lmlab's default template travels with a tokenizer it trained
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the cat?"}]
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(tok)
    assert tok.token_to_id("<|im_end|>") in stops and tok.eos_token_id in stops
    expected = lmlab.generate(model, ids, max_new_tokens=10, stop_token_ids=stops)
    text = "".join(lmlab.stream(model, tok, messages=messages, max_new_tokens=10))
    assert text == tok.decode(expected, skip_special_tokens=True)


def test_stream_never_splits_a_character(model_dir, monkeypatch):
    """Byte-level tokens of 'é🦙' arrive one byte at a time: every piece is whole text."""
    tok = lmlab.load_tokenizer(model_dir)
    byte_chars = tok._hf.pre_tokenizer.pre_tokenize_str("é🦙")  # [(byte-level string, span), ...]
    ids = [tok.token_to_id(ch) for s, _ in byte_chars for ch in s]
    assert len(ids) == 6 and None not in ids

    def fake_stream(model, prompts, params, compile=False):
        for i in ids:
            yield [i]
    monkeypatch.setattr(lmlab, "stream_ids", fake_stream)
    pieces = list(lmlab.stream(lmlab.load_model(model_dir), tok, "x"))
    assert pieces == ["é", "🦙"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=300)


def test_tokenizer_cli(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(CORPUS), encoding="utf-8")
    out = run("tokenizer", "train", "--data", str(data), "--vocab-size", "320", "--kind", "bpe",
              "--out", str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    enc = run("tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "The cat 🦙")
    assert enc.returncode == 0, enc.stderr
    tok = lmlab.load_tokenizer(tmp_path / "tok")
    assert json.loads(enc.stdout)["ids"] == tok.encode("The cat 🦙")
    bad = run("tokenizer", "train", "--data", str(data), "--vocab-size", "10", "--out", str(tmp_path / "t2"))
    assert bad.returncode == 2 and "below the byte alphabet" in bad.stderr


def test_generate_cli_with_prompt(model_dir):
    out = run("generate", "--model", str(model_dir), "--prompt", "The cat", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    assert out.stdout.rstrip("\n") == lmlab.generate(model, tok, "The cat", max_new_tokens=8)
