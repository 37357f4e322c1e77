"""`lmlab chat`: the real command in a pseudo-terminal (pexpect), and chat_loop's history handling in-process."""
import io
import os
import re
import subprocess
import sys
import warnings

import pexpect
import pytest
import torch
from conftest import spread_weights

import lmlab
from lmlab.data.world import make_world
from lmlab.serve import terminal
from lmlab.tokenizer import Tokenizer

# TERM=dumb keeps readline from writing escape sequences (bracketed paste) around the prompt.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
GREEDY = dict(temperature=0.0, top_p=0.9, max_new_tokens=8)  # what the spawned command runs with
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tok():
    # trained by lmlab, so it carries lmlab's ChatML template and its <|im_start|>/<|im_end|> tokens
    return Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind="bpe",
                           show_progress=False)


def tiny_decoder(tok, **overrides):
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       **overrides)
    model = lmlab.build(cfg).eval()
    spread_weights(model)  # outputs that depend on the prompt (conftest)
    return model


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatmodel")
    tiny_decoder(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def spawn(model_dir):
    return pexpect.spawn(sys.executable, ["-m", "lmlab", "chat", "--model", str(model_dir), "--temperature", "0",
                                          "--max-new-tokens", "8"], env=ENV, encoding="utf-8", timeout=60)


def reply(child, message):
    """Send a message; return the streamed reply (the text between 'assistant> ' and the next prompt)."""
    child.sendline(message)
    child.expect_exact("assistant> ")
    child.expect_exact("\r\nyou> ")  # the terminal writes each "\n" as "\r\n"
    return ANSI.sub("", child.before).replace("\r\n", "\n")


def expected(model_dir, messages):
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    return "".join(lmlab.stream(model, tok, messages=messages, **GREEDY))


def quit_(child, how="/quit"):
    if how == "ctrl-c":
        child.sendintr()
    else:
        child.sendline(how)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_reply_commands_and_quit(model_dir):
    child = spawn(model_dir)
    child.expect_exact("type /help for commands")
    child.expect_exact("you> ")
    question = "Where was Anna born?"
    want = expected(model_dir, [{"role": "user", "content": question}])
    assert want.strip(), "the tiny model stops at once; the comparison would check nothing"
    assert reply(child, question) == want

    child.sendline("/system Be brief.")
    child.expect_exact("system prompt set; history cleared")
    child.expect_exact("you> ")
    child.sendline("/system")
    child.expect_exact("system prompt: Be brief.")
    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate; type /help for commands")
    # /system started over: the history is [system, this message]; /reset does the same and keeps the system
    with_system = expected(model_dir, [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": question}])
    assert with_system != want, "the system prompt does not change the reply; check nothing"
    assert reply(child, question) == with_system
    child.sendline("/reset")
    child.expect_exact("history cleared (the system prompt stays)")
    assert reply(child, question) == with_system
    assert quit_(child) == 0


def test_second_turn_sees_the_first(model_dir):
    child = spawn(model_dir)
    child.expect_exact("you> ")
    first = reply(child, "Tell me about Anna.")
    second = reply(child, "And her employer?")
    history = [{"role": "user", "content": "Tell me about Anna."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And her employer?"}]
    assert second == expected(model_dir, history)
    assert second != expected(model_dir, history[2:]), "the history does not change the reply; check nothing"
    assert quit_(child, "ctrl-c") == 0  # Ctrl-C at the prompt leaves cleanly


def test_encoder_directory_is_refused(tmp_path):
    import transformers
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path)
    Tokenizer.train(["the cat sat on the mat"] * 20, 200, kind="wordpiece", show_progress=False).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lmlab", "chat", "--model", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=ENV, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr.strip() == ("lmlab chat: error: this is an encoder model (bert); chat needs a decoder language "
                                  "model (Llama, Mistral, Mixtral, Qwen2, GPT-2)")


def run_loop(model, tok, lines, **kw):
    out = io.StringIO()
    code = terminal.chat_loop(model, tok, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out,
                              **GREEDY, **kw)
    return code, out.getvalue()


def test_old_turns_are_dropped_when_the_context_is_full(tok, monkeypatch):
    model = tiny_decoder(tok, max_position_embeddings=64)  # budget: 64 - 8 = 56 prompt tokens
    seen, real_stream = [], lmlab.stream

    def recording_stream(model, tok, messages, **kw):
        seen.append(list(messages))
        return real_stream(model, tok, messages=messages, **kw)
    monkeypatch.setattr(terminal.lmlab, "stream", recording_stream)
    lines = [f"Question {i}: where did person {i} study?" for i in range(6)] + ["word " * 80, "Last one?"]
    code, out = run_loop(model, tok, lines, system="Be brief.")
    assert code == 0
    assert out.count("outgrew the model's context") == 1
    assert "Not sent." in out  # the 80-word message alone is too long
    assert len(seen) == 7 and all(m[0] == {"role": "system", "content": "Be brief."} for m in seen)
    assert all(terminal._prompt_len(tok, m) <= 56 for m in seen)
    assert len(seen[-1]) < 1 + 2 * 6 + 1  # older turns are gone ...
    assert seen[-1][-1] == {"role": "user", "content": "Last one?"}  # ... the newest stays, after a reply
    assert [m["role"] for m in seen[-1][1:]] == ["user", "assistant"] * (len(seen[-1]) // 2 - 1) + ["user"]


def test_interrupted_reply_is_not_kept(tok, monkeypatch):
    model = tiny_decoder(tok)
    seen = []

    def interrupted_once(model, tok, messages, **kw):
        seen.append(list(messages))
        yield "partial"
        if len(seen) == 1:
            raise KeyboardInterrupt
        yield " answer"
    monkeypatch.setattr(terminal.lmlab, "stream", interrupted_once)
    code, out = run_loop(model, tok, ["first", "", "second", "/help", "/exit", "never read"])
    assert code == 0 and "[interrupted; this turn is not kept]" in out and "/system TEXT" in out
    assert seen[1] == [{"role": "user", "content": "second"}]  # neither "first" nor its partial reply
    assert out.count("assistant> ") == 2
