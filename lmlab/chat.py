"""Chat templates: Hugging Face Jinja `chat_template`s -> text, ids and an assistant-only loss mask.

One module serves SFT data, generation and the server, so a conversation is tokenized the same way
everywhere. Templates come from the Hub and are untrusted code: they run in Jinja's immutable sandbox,
configured as transformers does (trim_blocks, lstrip_blocks, raise_exception, strftime_now, tojson,
`{% generation %}`), so rendering matches `apply_chat_template(..., tokenize=False)` character for character.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.errors import LmlabError


class ChatTemplateError(LmlabError, ValueError):
    """A chat template cannot be compiled or rendered, or a conversation is malformed."""


# lmlab's own template (ChatML). Assistant content and its <|im_end|> sit inside {% generation %}: the loss
# mask covers exactly what the model must produce, including the end-of-turn token, so it learns to stop.
# The newline after <|im_end|> stays outside: the next header, not the model, owns it. BOS only if one exists.
DEFAULT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The special tokens DEFAULT_TEMPLATE writes, which a tokenizer trained by lmlab must hold as single tokens
# (else the model cannot emit <|im_end|> as one stop token). BOS/EOS are the tokenizer's own, whatever they are.
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
# End-of-turn tokens of well-known template families, used by stop_token_ids() beside detection.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eot|>", "<|END_OF_TURN_TOKEN|>")

# Unicode noncharacters (reserved for internal use, never in real text) bracket {% generation %} output
# while we track assistant spans. Markers in the text survive Jinja's output buffering (macros, {% set %}
# blocks), which counting already-yielded characters does not.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_TRACKING: ContextVar[bool] = ContextVar("lmlab_chat_tracking", default=False)
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged, marked while tracking."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller):
        text = caller()
        return _OPEN + text + _CLOSE if _TRACKING.get() else text


class _Sandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox renders an unsafe attribute (`''.__class__`) as an empty undefined and only fails on
    # the next step; a template probing internals should fail loudly at once.
    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message):  # templates call raise_exception('...') to reject a conversation
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &), which would change tool schemas; transformers overrides it too.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _no_underscore(names):  # underscore names could shadow the internals the sandbox relies on
    if any(str(n).startswith("_") for n in names):
        raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_': {list(names)}")


class _Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):  # Jinja's own signature, so that namespace(self=...) still works
        _no_underscore(dict(*args[1:], **kwargs))
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name, value):  # {% set ns.x = ... %}
        _no_underscore([name])
        super().__setitem__(name, value)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k))  # a function, not the dict type to climb from
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any, where: str) -> Any:
    """Rebuild template inputs from plain JSON types, so the template sees no object with risky methods."""
    if value is None or isinstance(value, bool):
        return value if value is None else bool(value)
    if isinstance(value, (int, float)):  # subclasses (enums, numpy scalars) carry methods: strip them
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, str):
        if _OPEN in value or _CLOSE in value:
            raise ChatTemplateError(f"{where} contains the reserved characters U+FDD0/U+FDD1")
        return str.__str__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ChatTemplateError(f"{where} is a {type(value).__name__}; chat inputs must be JSON-like")


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}  # as transformers: content=None reads as absent
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} has no 'role' string: {m!r}")
        if "content" not in m and "tool_calls" not in m:
            raise ChatTemplateError(f"message {i} ({m['role']}) has no 'content'")
        if "content" in m and not isinstance(m["content"], (str, list, tuple)):
            raise ChatTemplateError(f"message {i} content must be a string or a list of parts")
        out.append(_plain(m, f"message {i}"))
    return out


def _render(template, messages, add_generation_prompt, special, track):
    ctx = {"tools": None, "documents": None}  # transformers passes both, so `tools is none` behaves alike
    # A missing special token is left undefined (not None), so `bos_token is defined` tells the truth.
    ctx.update({k: _plain(v, k) for k, v in special.items() if v is not None or k not in _SPECIAL_NAMES})
    ctx.update(messages=_check_messages(messages), add_generation_prompt=bool(add_generation_prompt))
    compiled, token = _compile(template), _TRACKING.set(track)
    try:
        return compiled.render(**ctx)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
    except jinja2.TemplateError as e:  # raise_exception(...) and undefined errors
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from None
    except Exception as e:  # e.g. `'a' + 1` in the template: name it, hide Jinja's internals
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _TRACKING.reset(token)


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, **special) -> str:
    """Render a chat template; `special` gives bos_token, eos_token, ... and any extra template variables."""
    return _render(template, messages, add_generation_prompt, special, track=False)


def _render_tracked(template, messages, add_generation_prompt, special) -> tuple[str, list[tuple[int, int]]]:
    """Render and return the character spans produced by {% generation %} blocks."""
    rendered = _render(template, messages, add_generation_prompt, special, track=True)
    text, spans, start, pos = [], [], None, 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", rendered):
        if piece == _OPEN and start is None:
            start = pos
        elif piece == _CLOSE and start is not None:
            spans.append((start, pos))
            start = None
        elif piece in (_OPEN, _CLOSE):
            raise ChatTemplateError("chat template has nested or unbalanced {% generation %} blocks")
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), spans


def _spans_by_prefix(template, messages, special, full) -> list[tuple[int, int]]:
    """Assistant spans for templates without {% generation %}: the text that rendering message i adds
    after the generation prompt. Exact, provided earlier turns render the same whatever follows them."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(template, messages[:i], True, **special)
        through = render(template, messages[: i + 1], False, **special)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"chat template is not prefix-stable (rendering the turns up to message {i} is not a prefix of "
                "the full conversation), so assistant tokens cannot be located; add {% generation %} blocks")
        turn, content = full[len(before):len(through)], m.get("content")
        # Drop whitespace after the end-of-turn token (ChatML's "\n"): a separator, not model output. Keep the
        # content's own trailing whitespace when the template copies the content verbatim.
        keep = len(content) if isinstance(content, str) and turn.startswith(content) else 0
        spans.append((len(before), len(before) + keep + len(turn[keep:].rstrip())))
    return spans


def _pick_template(tok, template):
    template = template or getattr(tok, "chat_template", None) or DEFAULT_TEMPLATE
    if template == DEFAULT_TEMPLATE:
        missing = [t for t in DEFAULT_SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ChatTemplateError(f"lmlab's default chat template needs the special tokens {missing} in the "
                                    "tokenizer (see lmlab.chat.DEFAULT_SPECIAL_TOKENS)")
    return template


def _special(tok) -> dict:
    return {k: getattr(tok, k, None) for k in _SPECIAL_NAMES}


def encode_chat(tok, messages, add_generation_prompt=False, template=None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask with 1 on the tokens the model must learn to produce
    (assistant content and its end-of-turn token). Exactly one BOS: the template's, else the tokenizer's."""
    template, special = _pick_template(tok, template), _special(tok)
    if _GENERATION_RE.search(template):
        text, spans = _render_tracked(template, messages, add_generation_prompt, special)
    else:
        text = render(template, messages, add_generation_prompt, **special)
        spans = _spans_by_prefix(template, messages, special, text)
    # The template already wrote every special token it wants, so the tokenizer must add none.
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=False)
    # A token is masked when its characters overlap a span (as transformers does): a token that straddles
    # a span edge is partly model output, and dropping it would leave that output untrained.
    covered = [False] * (len(text) + 1)
    for a, b in spans:
        covered[a:b] = [True] * (b - a)
    mask = [int(any(covered[s:e])) for s, e in offsets]
    bos_id, bos = tok.bos_token_id, getattr(tok, "bos_token", None)
    if bos and bos_id is not None and text.startswith(bos) and ids[:1] != [bos_id]:
        raise ChatTemplateError(f"the template writes {bos!r} but the tokenizer does not encode it as one token")
    if getattr(tok, "add_bos_token", False) and bos_id is not None and ids[:1] != [bos_id]:
        ids, mask = [bos_id] + ids, [0] + mask
    return ids, mask


def end_of_turn(template: str, **special) -> str | None:
    """The text a template writes right after an assistant message's content (e.g. '<|im_end|>'), or None."""
    probe = "lmlabEndOfTurnProbe"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    for convo in (turn, [{"role": "system", "content": "s"}] + turn):
        try:
            text = render(template, convo, False, **special)
        except ChatTemplateError:
            continue  # some templates insist on a system message or reject roles; try the next shape
        if probe in text:
            after = text[text.rindex(probe) + len(probe):].split()
            return after[0] if after else None
    return None


def stop_token_ids(tok, template=None) -> list[int]:
    """Ids that end generation: eos and the template's end-of-turn token(s), when each is one token."""
    template = _pick_template(tok, template)
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    candidates = [end_of_turn(template, **_special(tok))] + [t for t in KNOWN_END_OF_TURN if t in template]
    for text in filter(None, candidates):
        i = tok.token_to_id(text)
        # Only a token that the tokenizer produces from its text as a whole; a stray word is not a stop.
        if i is not None and i not in ids and tok.encode(text, add_special_tokens=False) == [i]:
            ids.append(i)
    return ids
