"""The `lmlab` command line and the text side of generate/stream."""
import subprocess
import sys

import lmlab


def run(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_verbs():
    out = run("--help")
    assert out.returncode == 0
    assert "generate" in out.stdout and "info" in out.stdout
    gen = run("generate", "--help")
    assert gen.returncode == 0 and "--max-new-tokens" in gen.stdout and "(default: 32)" in gen.stdout


def test_generate_command_matches_api(hf_dirs):
    d = hf_dirs("qwen2")
    out = run("generate", "--model", str(d), "--ids", "4,8,15,16", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    expected = lmlab.generate(lmlab.load_model(d), [4, 8, 15, 16], max_new_tokens=6)
    assert [int(t) for t in out.stdout.split()] == expected


def test_cli_error_is_one_clear_line(tmp_path):
    out = run("generate", "--model", str(tmp_path), "--ids", "1")
    assert out.returncode == 2
    assert out.stderr.strip() == f"lmlab generate: error: {tmp_path}: no config.json"


def test_info(hf_dirs):
    out = run("info", "--model", str(hf_dirs("mixtral")))
    assert out.returncode == 0 and '"num_local_experts": 4' in out.stdout


class CharTokenizer:
    """A minimal tokenizer (bytes as ids, 1 = eos) standing in until the tokenizer module exists."""
    eos_token_id = 1

    def encode(self, text):
        return [b % 64 + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 3 + 64) for i in ids if i >= 3)


def test_text_in_text_out(hf_dirs):
    model = lmlab.load_model(hf_dirs("llama"))
    tok = CharTokenizer()
    ids = lmlab.generate(model, tok.encode("hello"), max_new_tokens=8)
    text = lmlab.generate(model, tok, "hello", max_new_tokens=8)
    assert text == tok.decode(ids)
    assert lmlab.generate(model, tok, ["hello", "hi"], max_new_tokens=8)[0] == text
    assert "".join(lmlab.stream(model, tok, "hello", max_new_tokens=8)) == text


def test_console_script():
    from pathlib import Path
    out = subprocess.run([str(Path(sys.executable).parent / "lmlab"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout and "tokenizer" in out.stdout
