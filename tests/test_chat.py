"""Chat templates: rendering and assistant masks against transformers' apply_chat_template, BOS, sandbox, stops."""
import datetime

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab import chat
from lmlab.chat import DEFAULT_TEMPLATE, ChatTemplateError, encode_chat, render, stop_token_ids

transformers = pytest.importorskip("transformers", reason="transformers is the reference for chat templates")

# Templates written after real ones (Llama-3-8B-Instruct, Qwen2, Mistral-7B-Instruct-v0.3, the transformers
# docs' {% generation %} example); the multi-line ones exercise trim_blocks/lstrip_blocks.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content']|trim + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
GENERATION = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'assistant') %}
{{'<|im_start|>' + message['role'] + '\\n'}}{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\\n'}}
    {% else %}
{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
"""

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "Where was Ada Lovelace born?"},
    {"role": "assistant", "content": "Ada Lovelace was born in London."},
    {"role": "user", "content": "And what did she study?"},
    {"role": "assistant", "content": "She studied mathematics with De Morgan."},
]
CONVO = [SYSTEM] + TURNS
# Leading/trailing spaces and a newline in assistant text: tokens that straddle span edges.
AWKWARD = [SYSTEM, {"role": "user", "content": "Say it twice."},
           {"role": "assistant", "content": "\n\nIt twice, it twice.\n "}, {"role": "user", "content": "Thanks!"},
           {"role": "assistant", "content": "You are welcome. "}]
SPECIALS = ["<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|turn_end|>"]
CORPUS = [m["content"] for m in CONVO + AWKWARD] * 3 + ["\n\n\n\n" * 20] + [
    "The assistant answers questions about people, places and what they studied.",
    "Ada Lovelace wrote about the Analytical Engine of Charles Babbage in London."]


class StandInTokenizer:
    """The lmlab.tokenizer.Tokenizer interface chat.py relies on, over an HF `tokenizers.Tokenizer`.
    Swap for lmlab's class once it exists; these names are the whole contract."""

    def __init__(self, tk, chat_template=None, bos_token=None, eos_token=None, add_bos_token=False):
        self._tk, self.chat_template, self.add_bos_token = tk, chat_template, add_bos_token
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, None, None

    bos_token_id = property(lambda self: self.token_to_id(self.bos_token) if self.bos_token else None)
    eos_token_id = property(lambda self: self.token_to_id(self.eos_token) if self.eos_token else None)

    def encode(self, text, add_special_tokens=True):
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos_token else ids

    def encode_with_offsets(self, text, add_special_tokens=False):
        assert not add_special_tokens
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens=False):
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tk.token_to_id(token)


@pytest.fixture(scope="module")
def bpe():
    """A tiny byte-level BPE trained here, with the chat special tokens added."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def hf(tk, bos="<s>", eos="</s>"):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tk.to_str()),
                                                bos_token=bos, eos_token=eos)


def masked_runs(tok, ids, mask):
    """Decoded text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("name,template,bos,eos", [
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"), ("qwen", QWEN, None, "<|im_end|>"),
    ("mistral", MISTRAL, "<s>", "</s>"), ("generation", GENERATION, "<s>", "</s>"),
    ("default", DEFAULT_TEMPLATE, "<s>", "</s>")])
@pytest.mark.parametrize("convo", [CONVO, TURNS, CONVO[:4], AWKWARD], ids=["system", "nosystem", "open", "awkward"])
@pytest.mark.parametrize("agp", [False, True])
def test_render_matches_transformers(bpe, name, template, bos, eos, convo, agp):
    ref = hf(bpe, bos, eos).apply_chat_template(convo, chat_template=template, tokenize=False,
                                                add_generation_prompt=agp)
    ours = render(template, convo, agp, bos_token=bos, eos_token=eos)
    assert ours == ref
    assert "generation" not in ours and "\ufdd0" not in ours


@pytest.mark.parametrize("template", [GENERATION, DEFAULT_TEMPLATE])
@pytest.mark.parametrize("convo", [CONVO, AWKWARD, TURNS])
def test_generation_mask_matches_transformers(bpe, template, convo):
    ref = hf(bpe).apply_chat_template(convo, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    ids, mask = encode_chat(StandInTokenizer(bpe, template, "<s>", "</s>"), convo)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])
    assert 0 < sum(mask) < len(mask)


@pytest.mark.parametrize("template,bos,eot", [(DEFAULT_TEMPLATE, "<s>", "<|im_end|>"),
                                              (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
                                              (QWEN, None, "<|im_end|>")])
@pytest.mark.parametrize("convo", [CONVO, TURNS])
def test_mask_is_assistant_content_and_end_of_turn(bpe, template, bos, eot, convo):
    tok = StandInTokenizer(bpe, template, bos, "<|end_of_text|>")
    ids, mask = encode_chat(tok, convo)
    assert len(ids) == len(mask)
    assert masked_runs(tok, ids, mask) == [m["content"] + eot for m in convo if m["role"] == "assistant"]
    # The generation prompt is context, never a target.
    ids2, mask2 = encode_chat(tok, convo[:-1], add_generation_prompt=True)
    assert masked_runs(tok, ids2, mask2) == [m["content"] + eot for m in convo[:-1] if m["role"] == "assistant"]
    assert tok.decode(ids2).endswith("assistant" + ("<|end_header_id|>\n\n" if template is LLAMA3 else "\n"))


def test_mask_by_prefix_keeps_template_spacing(bpe):
    tok = StandInTokenizer(bpe, MISTRAL, "<s>", "</s>")
    ids, mask = encode_chat(tok, TURNS)
    assert masked_runs(tok, ids, mask) == [" " + m["content"] + "</s>" for m in TURNS[1::2]]


def test_prefix_unstable_template_is_reported(bpe):
    # Mistral v0.3 puts the system prompt into the *last* user turn, so earlier turns change as the chat grows.
    with pytest.raises(ChatTemplateError, match="prefix-stable"):
        encode_chat(StandInTokenizer(bpe, MISTRAL, "<s>", "</s>"), CONVO)


def test_exactly_one_bos(bpe):
    bos = "<|begin_of_text|>"
    tok = StandInTokenizer(bpe, LLAMA3, bos, "<|end_of_text|>", add_bos_token=True)
    ids, mask = encode_chat(tok, CONVO)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id and mask[0] == 0
    # A template without BOS text gets the tokenizer's BOS prepended once, the mask shifted with it.
    tok = StandInTokenizer(bpe, QWEN, bos, "<|end_of_text|>", add_bos_token=True)
    ids, mask = encode_chat(tok, CONVO)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id and mask[0] == 0
    assert masked_runs(tok, ids, mask) == [m["content"] + "<|im_end|>" for m in TURNS[1::2]]
    # lmlab's default template writes BOS only when the tokenizer has one.
    assert render(DEFAULT_TEMPLATE, CONVO).startswith("<|im_start|>system")
    ids, _ = encode_chat(StandInTokenizer(bpe, None, "<s>", "</s>", add_bos_token=True), CONVO)
    assert ids.count(bpe.token_to_id("<s>")) == 1 and ids[0] == bpe.token_to_id("<s>")


def test_sandbox_blocks_unsafe_attributes():
    for template in ["{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ ''.__class__ }}",
                     "{{ messages.__class__ }}", "{% set ns = namespace(__class__=1) %}{{ ns }}",
                     "{{ cycler.__init__.__globals__ }}", "{{ messages.append(1) }}"]:
        with pytest.raises(ChatTemplateError, match="sandbox"):
            render(template, CONVO)


def test_template_and_message_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render(MISTRAL, [SYSTEM, TURNS[1]])
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        render("{% for m in messages %}\n{{ m['content'] }", CONVO)
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render("{{ messages[0]['content'] + 1 }}", CONVO)
    with pytest.raises(ChatTemplateError, match="message 1 has no 'role'"):
        render(DEFAULT_TEMPLATE, [SYSTEM, {"content": "hi"}])
    with pytest.raises(ChatTemplateError, match="message 0 .user. has no 'content'"):
        render(DEFAULT_TEMPLATE, [{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="message 0 must be a dict"):
        render(DEFAULT_TEMPLATE, ["hi"])
    assert isinstance(ChatTemplateError("x"), ValueError)
    # Unknown roles are the template's business.
    assert "<|im_start|>tool\n42<|im_end|>" in render(DEFAULT_TEMPLATE, [{"role": "tool", "content": "42"}])


def test_helpers_and_generation_block_render_plainly():
    year = str(datetime.datetime.now().year)
    assert render("{{ strftime_now('%Y') }}", []) == year
    assert render("a{% generation %}{{ messages[0].content }}{% endgeneration %}b", TURNS) == "a" + TURNS[0]["content"] + "b"
    assert render("{{ tools is none }}{{ {'a': '<b>'} | tojson }}", []) == 'True{"a": "<b>"}'
    assert render("{{ x }}", [], x=7) == "7"


def test_default_template_needs_its_tokens(bpe):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    with pytest.raises(ChatTemplateError, match="<\\|im_start\\|>"):
        encode_chat(StandInTokenizer(tk), CONVO)


def test_stop_token_ids(bpe):
    tok = StandInTokenizer(bpe, LLAMA3, "<|begin_of_text|>", "<|end_of_text|>")
    assert stop_token_ids(tok) == [bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")]
    tok = StandInTokenizer(bpe, None, "<s>", "</s>")
    assert stop_token_ids(tok) == [bpe.token_to_id("</s>"), bpe.token_to_id("<|im_end|>")]
    assert chat.end_of_turn(QWEN) == "<|im_end|>"
    # Mistral's end of turn is eos itself: no duplicate.
    assert stop_token_ids(StandInTokenizer(bpe, MISTRAL, "<s>", "</s>")) == [bpe.token_to_id("</s>")]
    # An end-of-turn token no list knows is found by rendering.
    turn_end = "{% for m in messages %}{{ m.role + ': ' + m.content + '<|turn_end|>' }}\n{% endfor %}"
    assert stop_token_ids(StandInTokenizer(bpe, turn_end, "<s>", "</s>")) == [bpe.token_to_id(t) for t in
                                                                              ("</s>", "<|turn_end|>")]
    # Text that is not one token is not a stop id.
    assert stop_token_ids(StandInTokenizer(bpe, "{% for m in messages %}{{ m.content }} END.\n{% endfor %}",
                                           "<s>", "</s>")) == [bpe.token_to_id("</s>")]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_with_lmlab_tokenizer(kind):
    """The same contract through lmlab's own Tokenizer (byte-level BPE and SentencePiece with offsets)."""
    from lmlab.tokenizer import Tokenizer as LmlabTokenizer

    tok = LmlabTokenizer.train(CORPUS * 20, 700, kind, show_progress=False)
    for template, eot in [(None, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (QWEN, "<|im_end|>")]:
        ids, mask = encode_chat(tok, CONVO, template=template)
        assert masked_runs(tok, ids, mask) == [m["content"] + eot for m in TURNS[1::2]]
        if tok.bos_token_id is not None and (template is None or tok.add_bos_token):
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    stops = stop_token_ids(tok)
    assert tok.eos_token_id in stops and tok.token_to_id("<|im_end|>") in stops
