"""lmlab: build, train, align and serve language models in one small PyTorch codebase.

The public API (see shared/DESIGN.md): load_model, build, generate, stream, embed, ModelConfig.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lmlab.config import ModelConfig, preset
from lmlab.errors import CheckpointError, ConfigError, LmlabError
from lmlab.inference import SamplingParams, generate_ids, stream_ids
from lmlab.interop.hf import load_model
from lmlab.models import build
from lmlab.models.encoder import embed
from lmlab.tokenizer import TextStream, Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "LmlabError", "ModelConfig", "SamplingParams", "Tokenizer", "build",
           "embed", "export_gguf", "generate", "load_model", "load_tokenizer", "preset", "stream"]


def export_gguf(model_dir, out_path, dtype: str = "f32", name: str | None = None):
    """Write a model directory (with its tokenizer) as a GGUF file llama.cpp runs; dtype f32 | f16 | q8_0."""
    from lmlab.interop.gguf import export_gguf as _export
    return _export(model_dir, out_path, dtype=dtype, name=name)


def _params(model, tok, kw) -> SamplingParams:
    stop = kw.pop("stop_token_ids", None)
    if stop is None:  # default: the model's (and tokenizer's) end-of-sequence ids
        stop = list(model.config.eos_ids)
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None and eos not in stop:
            stop.append(eos)
    return SamplingParams(stop_token_ids=list(stop), **kw)


def _as_id_lists(ids) -> tuple[list[list[int]], bool]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        return [list(map(int, p)) for p in ids], True
    return [list(map(int, ids))], False


def generate(model, tok_or_ids, prompt: str | Sequence[str] | None = None, **kw):
    """Generate from token ids or text.

    generate(model, [1, 2, 3], max_new_tokens=16)         -> new ids (list[int]); a list of lists -> one per prompt
    generate(model, tok, "Once upon", max_new_tokens=64)  -> the continuation text (a list of texts for a list)
    Keyword arguments are those of SamplingParams (temperature=0 is greedy). Generation stops at the
    model's / tokenizer's eos id unless stop_token_ids is given. compile=True compiles the decode
    step (CPU: ~2x faster batch-1 decoding after a one-time compilation of ~20-60 s). Encoder-decoder
    models (T5) encode the prompt and return the new decoder tokens (inference/seq2seq.py; also num_beams,
    length_penalty, early_stopping).
    """
    compile = kw.pop("compile", False)
    if model.config.family == "encoder-decoder":  # T5: prompts feed the encoder; num_beams=k for beam search
        from lmlab.inference.seq2seq import generate_seq2seq
        beam = {k: kw.pop(k) for k in ("num_beams", "length_penalty", "early_stopping") if k in kw}
        run = lambda prompts, tok: generate_seq2seq(model, prompts, **vars(_params(model, tok, kw)), **beam)
    else:
        run = lambda prompts, tok: generate_ids(model, prompts, _params(model, tok, kw), compile)
    if prompt is None:
        prompts, batched = _as_id_lists(tok_or_ids)
        out = run(prompts, None)
        return out if batched else out[0]
    tok = tok_or_ids
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    out = run([tok.encode(t) for t in texts], tok)
    decoded = [tok.decode(ids, skip_special_tokens=True) for ids in out]
    return decoded[0] if isinstance(prompt, str) else decoded


def stream(model, tok_or_ids, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> Iterator:
    """Like generate for one prompt, but yields each new token id (ids in) or text piece (text in) as it
    comes. With messages=[{"role": ..., "content": ...}], the tokenizer's chat template (lmlab's default
    if it has none) renders the conversation and generation stops at eos or the end-of-turn token.
    Text pieces never split a multi-byte character."""
    compile = kw.pop("compile", False)

    def steps(ids, tok):  # each new token id
        if model.config.family == "encoder-decoder":  # T5: generated in one go (greedy or beams), then yielded
            yield from generate(model, [ids], **kw)[0]
            return
        for step in stream_ids(model, [ids], _params(model, tok, kw), compile):
            yield step[0]

    if prompt is None and messages is None:
        prompts, _ = _as_id_lists(tok_or_ids)
        if len(prompts) != 1:
            raise ValueError("stream takes one prompt")
        yield from steps(prompts[0], None)
        return
    tok = tok_or_ids
    if messages is not None:
        from lmlab.chat import encode_chat, stop_token_ids
        ids = encode_chat(tok, messages, add_generation_prompt=True)[0]
        kw.setdefault("stop_token_ids", sorted(set(stop_token_ids(tok)) | set(model.config.eos_ids)))
    else:
        ids = tok.encode(prompt)
    text = TextStream(tok)
    for token in steps(ids, tok):
        if piece := text.add(token):
            yield piece
    if piece := text.flush():  # generation ended inside a character
        yield piece
