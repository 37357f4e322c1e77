"""Preference data: rankings and (prompt, chosen, rejected) pairs, for the reward model and DPO.

Accepted records (.jsonl, one object per line), or the built-in world's rankings:
    {"prompt": ..., "chosen": "...", "rejected": "...", "margin": 0.5 (optional)}      a pair
    {"prompt": ..., "responses": ["best", "second", ..., "worst"]}                    a K-way ranking
A prompt is a string (one user message) or a messages list ending with a user turn. A ranking of K
responses gives its K(K-1)/2 (better, worse) pairs; with reward.margin m > 0 a pair i < j asks for a
reward gap of m * (j - i) (Llama 2's margin loss, by rank distance). Rankings are split into train and
validation by prompt, so no validation prompt is ever trained on.
"""
from __future__ import annotations

import numpy as np

from lmlab.data.text import DataError, iter_records


def _check_prompt(prompt, where: str):
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in prompt) and prompt[-1].get("role") == "user"):
        return prompt
    raise DataError(f"{where}: 'prompt' must be a string or a messages list ending with a user message")


def load_rankings(source, world_seed: int = 0, world_people: int = 100) -> list[dict]:
    """-> [{"prompt", "responses" (best first), "margin" (optional: a pair record's own margin)}]."""
    if source == "world":
        from lmlab.data.world import make_world
        return make_world(seed=world_seed, n_people=world_people).preferences()
    out = []
    for where, rec in iter_records(source):
        if "prompt" not in rec:
            raise DataError(f"{where}: no 'prompt' field (fields: {sorted(rec)[:10]})")
        prompt = _check_prompt(rec["prompt"], where)
        if "responses" in rec:
            responses = rec["responses"]
        elif "chosen" in rec and "rejected" in rec:
            responses = [rec["chosen"], rec["rejected"]]
        else:
            raise DataError(f"{where}: expected 'chosen' + 'rejected' (a pair) or 'responses' (a ranking, best first)")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: a ranking needs at least two string responses")
        row = {"prompt": prompt, "responses": responses}
        if "margin" in rec:
            row["margin"] = float(rec["margin"])
        out.append(row)
    if not out:
        raise DataError(f"{source}: no preference records found")
    return out


def split_rankings(rankings: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val) by prompt text, in a seeded shuffle: val gets round(n * val_fraction) of the distinct prompts
    with all their rankings, so no validation prompt is ever trained on."""
    import json

    key = lambda r: r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"])  # noqa: E731
    prompts = sorted({key(r) for r in rankings})
    order = np.random.default_rng([seed, 7]).permutation(len(prompts))
    val_prompts = {prompts[i] for i in order[:round(len(prompts) * val_fraction)]}
    return [r for r in rankings if key(r) not in val_prompts], [r for r in rankings if key(r) in val_prompts]


def to_pairs(rankings: list[dict], margin: float = 0.0) -> list[dict]:
    """Every (better, worse) pair of each ranking: {"prompt", "chosen", "rejected", "margin"}."""
    pairs = []
    for r in rankings:
        resp = r["responses"]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                pairs.append({"prompt": r["prompt"], "chosen": resp[i], "rejected": resp[j],
                              "margin": r.get("margin", margin * (j - i))})
    return pairs


def chat_of(prompt, response: str | None = None) -> list[dict]:
    """A prompt (string or messages) [+ the assistant's response] as a messages list."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + ([{"role": "assistant", "content": response}] if response is not None else [])


def encode_ranking(tok, ranking: dict, margin: float = 0.0) -> dict:
    """Each response of a ranking encoded once, and its pairs by index: {"responses": [(ids, mask), ...] best
    first, "pairs": [(better, worse, margin), ...]}. The reward model scores K responses with K forward rows
    instead of the K(K-1) rows of its pairs (InstructGPT's batching)."""
    from lmlab.chat import encode_chat

    resp = ranking["responses"]
    return {"responses": [encode_chat(tok, chat_of(ranking["prompt"], r)) for r in resp],
            "pairs": [(i, j, ranking.get("margin", margin * (j - i)))
                      for i in range(len(resp)) for j in range(i + 1, len(resp))]}


def encode_pair(tok, pair: dict) -> dict:
    """Token ids and assistant masks of both sides: {"chosen": (ids, mask), "rejected": (ids, mask), "margin"}."""
    from lmlab.chat import encode_chat

    return {"chosen": encode_chat(tok, chat_of(pair["prompt"], pair["chosen"])),
            "rejected": encode_chat(tok, chat_of(pair["prompt"], pair["rejected"])),
            "margin": pair.get("margin", 0.0)}
