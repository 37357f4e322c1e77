"""Scoring a chat model on the built-in world, whose truth is known (see lmlab.data.world).

- `generate_responses` / `answer_questions`: each question as one user turn of the tokenizer's chat
  template, answered in length-sorted batches (greedy by default; equal to answering each alone);
- `score_answers`: accuracy, "I don't know" / invention rates and mean gold reward of answers (no model);
- `world_qa`: the QA metrics of the run directory's report (qa_acc_seen, qa_acc_heldout, idk_rate, ...);
- `kl_to_reference`: a Monte-Carlo estimate of KL(policy || reference) per response, as RLHF reports it.
"""
from __future__ import annotations

import random

import torch

SPLITS = ("seen", "heldout", "unknown")


def _stop_ids(model, tok) -> list[int]:
    from lmlab.chat import stop_token_ids

    return sorted(set(stop_token_ids(tok)) | set(model.config.eos_ids))


def generate_responses(model, tok, questions: list[str], max_new_tokens: int = 64, batch_size: int = 32,
                       temperature: float = 0.0, seed: int | None = None
                       ) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Answer each question as a single user message -> (prompt_ids, response_ids, texts), in input order.

    prompt_ids[i]: the rendered chat prompt (ending with the assistant header); response_ids[i]: the new ids,
    ending with the stop token when one was emitted (eos or the template's end-of-turn); texts[i]: the
    response decoded without special tokens, stripped. Prompts are sorted by length so a batch (left-padded
    by the engine) wastes little; with temperature 0 the result equals answering each question alone.
    With temperature > 0 and a seed, batch b samples with seed + b: the same call gives the same samples.
    """
    from lmlab.chat import encode_chat
    from lmlab.inference import SamplingParams, generate_ids

    prompts = [encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep input order
    stop = _stop_ids(model, tok)
    responses: list[list[int]] = [[] for _ in prompts]
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start: start + batch_size]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop,
                                seed=None if seed is None else seed + b)
        for i, ids in zip(rows, generate_ids(model, [prompts[i] for i in rows], params)):
            responses[i] = ids
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in responses]
    return prompts, responses, texts


def answer_questions(model, tok, questions: list[str], max_new_tokens: int = 64, batch_size: int = 32,
                     temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The model's answer (text) to each question, in input order; greedy by default. See generate_responses."""
    return generate_responses(model, tok, questions, max_new_tokens, batch_size, temperature, seed)[2]


def score_answers(world, records: list[dict], responses: list[str]) -> dict:
    """Score responses to world.eval_questions records (pure: no model).

    -> {"n", "accuracy" (world.check_answer), "gold_reward" (mean world.gold_reward)} and, when some records
    are about unknown people, "idk_rate" (their answers that say "I don't know" and state no fact, i.e.
    check_answer) and "invented_rate" (their answers that state any fact: an attribute value, date or name).
    Rates are fractions in [0, 1]; an empty input gives n = 0 and no other key.
    """
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    if not records:
        return {"n": 0}
    correct = [world.check_answer(r, a) for r, a in zip(records, responses)]
    rewards = [world.gold_reward(r["question"], a) for r, a in zip(records, responses)]
    out = {"n": len(records), "accuracy": sum(correct) / len(records), "gold_reward": sum(rewards) / len(records)}
    unknown = [(c, a) for r, c, a in zip(records, correct, responses) if r.get("value") is None]
    if unknown:
        out["idk_rate"] = sum(c for c, _ in unknown) / len(unknown)
        out["invented_rate"] = sum(bool(world._mentions(a.replace("\u2019", "'"))) for _, a in unknown) / len(unknown)
    return out


def eval_records(world, limit: int | None = None) -> dict[str, list[dict]]:
    """{split: world.eval_questions(split)[:limit]} for the seen, held-out and unknown splits."""
    return {s: world.eval_questions(s)[:limit] for s in SPLITS}


def world_qa(model, tok, world, max_new_tokens: int = 64, batch_size: int = 32, limit: int | None = None) -> dict:
    """Greedy answers to the world's eval questions, scored -> flat dict of floats:

    qa_acc_seen, qa_acc_heldout: fraction of seen (SFT) / held-out people's attribute questions answered right;
    idk_rate, invented_rate: for people not in the world, fraction answered "I don't know" (stating no fact)
    / answered with an invented fact; gold_reward: mean gold reward over all answers, and per split
    (gold_reward_seen, ...); n_questions. `limit`: at most this many questions per split (quick checks).
    """
    records = eval_records(world, limit)
    flat = [r for s in SPLITS for r in records[s]]
    answers = answer_questions(model, tok, [r["question"] for r in flat], max_new_tokens, batch_size)
    scores, i = {}, 0
    for s in SPLITS:
        scores[s] = score_answers(world, records[s], answers[i: i + len(records[s])])
        i += len(records[s])
    out = {"qa_acc_seen": scores["seen"].get("accuracy", float("nan")),
           "qa_acc_heldout": scores["heldout"].get("accuracy", float("nan")),
           "idk_rate": scores["unknown"].get("idk_rate", float("nan")),
           "invented_rate": scores["unknown"].get("invented_rate", float("nan")),
           "gold_reward": score_answers(world, flat, answers).get("gold_reward", float("nan"))}
    out.update({f"gold_reward_{s}": scores[s].get("gold_reward", float("nan")) for s in SPLITS})
    out["n_questions"] = len(flat)
    return out


def sample_conversations(model, tok, world, n: int = 4, seed: int = 0, max_new_tokens: int = 64) -> list[dict]:
    """A few greedy conversations for reports: [{"question", "answer", "correct", "split"}], the splits taken
    in turn (seen, held-out, unknown, seen, ...), the questions drawn with `seed`."""
    rng, records = random.Random(seed), eval_records(world)
    picked = [rng.choice(records[SPLITS[k % len(SPLITS)]]) for k in range(n)]
    answers = answer_questions(model, tok, [r["question"] for r in picked], max_new_tokens)
    return [{"question": r["question"], "answer": a, "correct": world.check_answer(r, a), "split": r["split"]}
            for r, a in zip(picked, answers)]


@torch.inference_mode()
def response_logratios(policy, ref, prompts: list[list[int]], responses: list[list[int]],
                       batch_size: int = 32) -> list[float]:
    """Per sequence, sum over its response tokens of log pi(token) - log ref(token), both given the prompt and
    the response so far. prompts[i] + responses[i] is scored right-padded (causal attention: real tokens never
    see the padding, so no mask); an empty response gives 0. Put both models in eval mode (no dropout)."""
    from lmlab.train.posttrain import pad_right, token_logprobs

    out = []
    for start in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[start: start + batch_size], responses[start: start + batch_size]))
        ids = pad_right([p + r for p, r in batch], pad_id=0)  # (B, T)
        diff = (token_logprobs(policy, ids.to(policy.device)).cpu()
                - token_logprobs(ref, ids.to(ref.device)).cpu())  # (B, T - 1): entry t scores token t + 1
        for b, (p, r) in enumerate(batch):
            out.append(float(diff[b, len(p) - 1: len(p) - 1 + len(r)].sum()))
    return out


def kl_to_reference(policy, ref, tok, questions: list[str], samples_per_question: int = 1, max_new_tokens: int = 64,
                    temperature: float = 1.0, seed: int | None = 0, batch_size: int = 32) -> float:
    """Monte-Carlo estimate of KL(pi || ref) per response: sample responses y ~ pi(. | x) (temperature 1 samples
    pi itself; seeded, so the same call gives the same samples, see generate_responses) and average
    sum_t [log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)] over the sampled sequences (the response's tokens
    only, its stop token included). Unbiased for the sequence-level KL; a single sample can be negative.
    0 exactly when ref is policy. Both models must share the tokenizer `tok`."""
    if policy.config.vocab_size != ref.config.vocab_size:
        raise ValueError(f"policy and reference vocabularies differ ({policy.config.vocab_size} vs "
                         f"{ref.config.vocab_size}): KL needs the same tokenizer")
    repeated = [q for q in questions for _ in range(samples_per_question)]
    if not repeated:
        raise ValueError("kl_to_reference needs at least one question")
    prompts, responses, _ = generate_responses(policy, tok, repeated, max_new_tokens, batch_size, temperature, seed)
    ratios = response_logratios(policy, ref, prompts, responses, batch_size)
    return sum(ratios) / len(ratios)


def world_scores(model, tok, world, ref=None, limit: int | None = None, max_new_tokens: int = 64,
                 batch_size: int = 32, seed: int = 0) -> dict:
    """world_qa, plus "kl" (kl_to_reference over the same questions) when a reference model is given."""
    out = world_qa(model, tok, world, max_new_tokens, batch_size, limit)
    if ref is not None:
        questions = [r["question"] for s in SPLITS for r in eval_records(world, limit)[s]]
        out["kl"] = kl_to_reference(model, ref, tok, questions, max_new_tokens=max_new_tokens, seed=seed,
                                    batch_size=batch_size)
    return out


# ---- tasks for `lmlab eval` (each: model_dir + options -> flat dict) ----------------------------------

def _load(model_dir, world_seed=None, people=None):
    import lmlab
    from lmlab.data.world import make_world
    from lmlab.train.posttrain import world_settings

    settings = world_settings(model_dir)  # the world the model was trained on, from its lmlab.json
    if world_seed is not None:
        settings["seed"] = world_seed
    if people is not None:
        settings["n_people"] = people
    return lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir), make_world(**settings), settings


def world_qa_task(model_dir, world_seed: int | None = None, people: int | None = None, limit: int | None = None,
                  max_new_tokens: int = 64, batch_size: int = 32) -> dict:
    """`lmlab eval --task world-qa`: world_qa on the world the model was trained on (seed and size from its
    lmlab.json unless world_seed / people are given)."""
    model, tok, world, settings = _load(model_dir, world_seed, people)
    out = world_qa(model, tok, world, max_new_tokens, batch_size, limit)
    return {**out, "world_seed": settings["seed"], "world_people": settings["n_people"]}


def world_gold_task(model_dir, ref: str | None = None, world_seed: int | None = None, people: int | None = None,
                    limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0) -> dict:
    """`lmlab eval --task world-gold`: mean gold reward of greedy answers to all eval questions (and per split);
    with `ref` (a model directory, e.g. the SFT model a PPO/DPO run started from), also "kl": the Monte-Carlo
    KL(model || ref) per sampled response (temperature 1, seeded) over the same questions."""
    import lmlab

    model, tok, world, settings = _load(model_dir, world_seed, people)
    scores = world_scores(model, tok, world, lmlab.load_model(ref) if ref is not None else None, limit,
                          max_new_tokens, batch_size, seed)
    out = {k: v for k, v in scores.items() if k.startswith("gold_reward") or k in ("kl", "n_questions")}
    return {**out, "world_seed": settings["seed"], "world_people": settings["n_people"]}
