"""Instruction data: conversations -> token ids + an assistant-only loss mask -> (packed) training rows.

Accepted records (one JSON object per line of .jsonl files, or the built-in world's SFT set):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}     chat format
    {"instruction": "...", "input": "... (optional)", "output": "..."}                alpaca format
Each conversation is rendered with the tokenizer's chat template (lmlab's ChatML when it has none) by
`lmlab.chat.encode_chat`, which also marks the tokens the model must produce: assistant content and its
end-of-turn token. Only those carry loss.

Packing (data.packing): short conversations are concatenated into rows of seq_len + 1 tokens, so a batch
holds few pad tokens. As in TRL's classic packing, a row's conversations can attend to the ones before
them in the row; each starts with its own template header, and the loss mask is unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

from lmlab.data.text import DataError, iter_records
from lmlab.train.posttrain import IGNORE


def to_messages(record: dict, where: str = "record") -> list[dict]:
    """A chat or alpaca record -> a messages list (checked: roles, string contents, an assistant turn)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise DataError(f"{where}: expected 'messages' (chat format) or 'instruction' + 'output' (alpaca format), "
                        f"got fields {sorted(record)[:10]}")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a role (system|user|assistant) and string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return messages


def load_conversations(source, world_seed: int = 0, world_people: int = 100) -> list[list[dict]]:
    """'world' (the built-in SFT set) or .jsonl files/folders/globs -> messages lists."""
    if source == "world":
        from lmlab.data.world import make_world
        return make_world(seed=world_seed, n_people=world_people).sft_examples()
    convs = [to_messages(rec, where) for where, rec in iter_records(source)]
    if not convs:
        raise DataError(f"{source}: no conversations found")
    return convs


def encode_conversations(tok, conversations) -> list[tuple[list[int], list[int]]]:
    """-> [(ids, mask)], mask 1 on assistant tokens; conversations whose mask is all zero are an error."""
    from lmlab.chat import encode_chat

    out = []
    for i, messages in enumerate(conversations):
        ids, mask = encode_chat(tok, messages)
        if not any(mask):
            raise DataError(f"conversation {i}: the chat template marks no assistant tokens")
        out.append((ids, mask))
    return out


def make_rows(examples, seq_len: int, pad_id: int, packing: bool = True, seed: int = 0) -> list[tuple]:
    """(ids, mask) examples -> rows (x, y) of seq_len tokens each: y is the next token where it is trained on,
    IGNORE elsewhere. A conversation longer than seq_len + 1 tokens is cut (its tail is lost: raise seq_len).
    With packing, examples (in a seeded shuffle) fill rows greedily; without, one example per row."""
    order = np.random.default_rng(seed).permutation(len(examples)) if packing else range(len(examples))
    rows, ids_row, mask_row = [], [], []

    def flush():
        if ids_row:
            ids = ids_row + [pad_id] * (seq_len + 1 - len(ids_row))
            labels = [t if m else IGNORE for t, m in zip(ids_row[1:], mask_row[1:])]
            labels += [IGNORE] * (seq_len - len(labels))
            rows.append((ids[:-1], labels))
        ids_row.clear()
        mask_row.clear()

    for i in order:
        ids, mask = examples[i][0][: seq_len + 1], examples[i][1][: seq_len + 1]
        if not packing or len(ids_row) + len(ids) > seq_len + 1:
            flush()
        ids_row.extend(ids)
        mask_row.extend(mask)
    flush()
    return rows


def collate_rows(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """[(x, y)] -> x (B, T), y (B, T) LongTensors."""
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
