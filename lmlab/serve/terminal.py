"""`lmlab chat`: talk to a model directory in the terminal.

The conversation is a messages list (the optional system message first, then alternating user/assistant
turns) that the tokenizer's chat template renders (lmlab.chat; lmlab's ChatML template if it has none);
each reply streams token by token from lmlab.stream.

Two choices worth knowing:
- Ctrl-C during a reply stops it and drops the whole turn (the question and the partial reply): a half
  answer in the history would steer later replies, and keeping only the question would leave two user
  messages in a row, which many templates reject.
- When the prompt would no longer leave room for max_new_tokens in the model's context, the oldest
  user/assistant turns are dropped (the system message stays), and the user is told once.
"""
from __future__ import annotations

import sys

import lmlab
from lmlab.chat import encode_chat
from lmlab.errors import LmlabError

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation; /system alone shows it
  /help          this list
  /quit, /exit   leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during a reply stops it; that turn (question and partial reply) is not kept."""


def check_chat_model(model) -> None:
    """Raise LmlabError unless the model can chat: a decoder with a language-model head."""
    family = model.config.family
    if family != "decoder":
        raise LmlabError(f"this is an {family} model ({model.config.model_type}); chat needs a decoder language "
                         "model (Llama, Mistral, Mixtral, Qwen2, GPT-2)")
    if getattr(model, "lm_head", None) is None:
        raise LmlabError("this model has no language-model head (a reward model?); chat needs a decoder language model")


def _prompt_len(tok, messages) -> int:
    return len(encode_chat(tok, messages, add_generation_prompt=True)[0])


def _fit(tok, head: list[dict], turns: list[dict], budget: int) -> list[dict]:
    """The newest turns that fit in `budget` prompt tokens together with `head` (the system message).
    Turns alternate user/assistant and end with a user message, so dropping two keeps that shape."""
    while len(turns) > 2 and _prompt_len(tok, head + turns) > budget:
        turns = turns[2:]
    return turns


def _reader(stdin, stdout):
    """A function prompt -> line that raises EOFError at the end of input."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:  # on a real terminal, input() then gets line editing and up-arrow history
            import readline  # noqa: F401
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return read


def chat_loop(model, tok, system=None, temperature=0.7, top_p=0.9, max_new_tokens=256, seed=None,
              stdin=None, stdout=None, name=None) -> int:
    """Chat until /quit, /exit, end of input or Ctrl-C at the prompt; returns the exit code (0).
    stdin/stdout default to the process's own (looked up at call time). `name` labels the banner.
    Raises LmlabError when the model cannot chat or the tokenizer has no usable chat template."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    check_chat_model(model)
    context = model.config.max_position_embeddings
    budget = context - max_new_tokens  # prompt tokens that still leave room for a full reply
    if budget <= 0:
        raise LmlabError(f"max_new_tokens={max_new_tokens} leaves no room for the conversation in the model's "
                         f"context of {context} tokens")
    # Render once now, so a tokenizer without a usable template fails here rather than at the first message.
    encode_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    read = _reader(stdin, stdout)

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    params = f"{model.num_params() / 1e6:.1f}M parameters, " if hasattr(model, "num_params") else ""
    say(f"lmlab chat with {name or model.config.model_type} ({params}context {context} tokens)")
    say("type /help for commands")
    history: list[dict] = []  # user/assistant turns; the system message is put in front when rendering
    warned = False
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            say()  # leave the shell prompt on a line of its own
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history.clear()
                say("history cleared (the system prompt stays)")
            elif command == "/system" and arg:
                system = arg
                history.clear()
                say("system prompt set; history cleared")
            elif command == "/system":
                say(f"system prompt: {system}" if system else "no system prompt (set one with /system TEXT)")
            elif command == "/help":
                say(HELP)
            else:
                say(f"unknown command {command}; type /help for commands")
            continue

        head = [{"role": "system", "content": system}] if system else []
        history.append({"role": "user", "content": line})
        kept = _fit(tok, head, history, budget)
        if len(kept) < len(history):
            history[:] = kept
            if not warned:
                say(f"(the conversation outgrew the model's context of {context} tokens: the oldest turns are "
                    "dropped from now on)")
                warned = True
        length = _prompt_len(tok, head + history)
        if length > budget:  # the newest message alone does not fit
            history.pop()
            say(f"error: that message makes a {length}-token prompt; with max_new_tokens={max_new_tokens} the "
                f"model's context of {context} tokens leaves room for {budget}. Not sent.")
            continue

        stdout.write("assistant> ")
        stdout.flush()
        pieces = []
        try:
            for piece in lmlab.stream(model, tok, messages=head + history, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=seed):
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            history.pop()
            say(" [interrupted; this turn is not kept]")
            continue
        except (LmlabError, ValueError) as e:  # e.g. a template that rejects a system message set by /system
            history.pop()
            say(f"\nerror: {e}")
            continue
        say()
        history.append({"role": "assistant", "content": "".join(pieces)})
