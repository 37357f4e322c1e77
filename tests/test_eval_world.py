"""World scoring: pure answer scoring, batched chat answering, the KL estimate and `lmlab eval --task world-*`."""
import copy
import json
from collections import Counter

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.data.world import answer, make_world
from lmlab.eval import TASKS, run_eval
from lmlab.eval.world import (
    SPLITS,
    answer_questions,
    generate_responses,
    kl_to_reference,
    sample_conversations,
    score_answers,
    world_qa,
)
from lmlab.tokenizer import Tokenizer

WORLD = {"seed": 3, "n_people": 20, "n_unknown": 5}


@pytest.fixture(scope="module")
def world():
    return make_world(**WORLD)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world):
    """A tiny random Llama + a BPE tokenizer trained on the world's text, saved as one model directory.
    Weights are spread (default init answers one token over and over) and a token the model often emits is
    made a second eos, so greedy answers stop at different lengths."""
    texts = world.pretrain_docs() + [m["content"] for ex in world.sft_examples() for m in ex]
    tok = Tokenizer.train(texts, 512, kind="bpe", show_progress=False)
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = lmlab.build(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name else 0.0)
    _, ids, _ = generate_responses(model, tok, questions(world, 3), max_new_tokens=10)
    common = Counter(t for row in ids for t in set(row[1:])).most_common(1)[0][0]
    model.config.eos_token_id = [tok.eos_token_id, common]
    d = tmp_path_factory.mktemp("worldmodel")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_tok(model_dir):
    return lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)


def questions(world, per_split=4):
    return [r["question"] for s in SPLITS for r in world.eval_questions(s)[:per_split]]


def test_gold_answers_score_perfectly(world):
    for split in SPLITS:
        records = world.eval_questions(split)
        out = score_answers(world, records, [r["answer"] for r in records])
        assert out["n"] == len(records) > 0 and out["accuracy"] == 1.0, split
        assert out["gold_reward"] == pytest.approx(sum(world.gold_reward(r["question"], r["answer"])
                                                       for r in records) / len(records))
        if split == "unknown":
            assert out["idk_rate"] == 1.0 and out["invented_rate"] == 0.0
        else:
            assert "idk_rate" not in out


def test_wrong_and_invented_answers_score_zero(world):
    donor = world.people[0]
    for split in SPLITS:
        records = world.eval_questions(split)
        wrong = []
        for r in records:
            if r["value"] is None:  # an invention: someone's facts stated about an unknown name
                wrong.append(answer(r["name"], r["attribute"], donor.facts()))
                continue
            person = next(p for p in world.people if p.name == r["name"])
            other = next(p for p in world.people if p.value(r["attribute"]) != r["value"])
            wrong.append(answer(r["name"], r["attribute"], {**person.facts(), r["attribute"]: other.value(r["attribute"])}))
        out = score_answers(world, records, wrong)
        assert out["accuracy"] == 0.0, split
        assert out["gold_reward"] < 0
        if split == "unknown":
            assert out["idk_rate"] == 0.0 and out["invented_rate"] == 1.0
    # hedging does not excuse an invention; a bare "I don't know" is no invention
    r = world.eval_questions("unknown")[0]
    mixed = score_answers(world, [r, r], [f"I don't know, but {r['name']} was born in Paris.",
                                          f"I don't know who {r['name']} is."])
    assert mixed["idk_rate"] == 0.5 and mixed["invented_rate"] == 0.5
    with pytest.raises(ValueError):
        score_answers(world, [r], [])


def test_batched_answers_equal_one_by_one(model_tok, world):
    model, tok = model_tok
    qs = questions(world, 3)
    _, ids, batched = generate_responses(model, tok, qs, max_new_tokens=10, batch_size=4)
    alone = [answer_questions(model, tok, [q], max_new_tokens=10)[0] for q in qs]
    assert batched == alone
    assert answer_questions(model, tok, qs, max_new_tokens=10, batch_size=64) == alone
    assert len({len(i) for i in ids}) > 1  # some rows stopped early: padding and stop handling were exercised


def test_world_qa_metrics(model_tok, world):
    model, tok = model_tok
    out = world_qa(model, tok, world, max_new_tokens=6, limit=2)
    keys = {"qa_acc_seen", "qa_acc_heldout", "idk_rate", "invented_rate", "gold_reward", "gold_reward_seen",
            "gold_reward_heldout", "gold_reward_unknown", "n_questions"}
    assert set(out) == keys and out["n_questions"] == 6
    assert all(isinstance(v, float) and -2 < v <= 1 for k, v in out.items() if k != "n_questions")
    convo = sample_conversations(model, tok, world, n=4, max_new_tokens=6)
    assert [c["split"] for c in convo] == ["seen", "heldout", "unknown", "seen"]
    assert all(set(c) >= {"question", "answer", "correct"} for c in convo)


def _kl_by_hand(policy, ref, prompts, responses):
    """Per sequence, alone, through the full-vocabulary log-softmax."""
    total = 0.0
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = torch.log_softmax(policy(ids)[0].double(), -1)
            lq = torch.log_softmax(ref(ids)[0].double(), -1)
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        target = torch.tensor(r)
        total += float((lp[pos, target] - lq[pos, target]).sum())
    return total / len(prompts)


def test_kl_to_reference(model_tok, world):
    model, tok = model_tok
    qs = questions(world, 2)
    assert kl_to_reference(model, model, tok, qs, max_new_tokens=8, batch_size=4) == pytest.approx(0, abs=1e-6)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = kl_to_reference(model, ref, tok, qs, max_new_tokens=8, seed=5, batch_size=4)
    prompts, responses, _ = generate_responses(model, tok, qs, max_new_tokens=8, batch_size=4, temperature=1.0,
                                               seed=5)
    assert kl == pytest.approx(_kl_by_hand(model, ref, prompts, responses), abs=1e-4)
    assert abs(kl) > 1e-3
    # more samples per question: the same questions repeated, sampled from the policy
    kl2 = kl_to_reference(model, ref, tok, qs[:2], samples_per_question=3, max_new_tokens=8, seed=5, batch_size=4)
    prompts, responses, _ = generate_responses(model, tok, [q for q in qs[:2] for _ in range(3)], max_new_tokens=8,
                                               batch_size=4, temperature=1.0, seed=5)
    assert kl2 == pytest.approx(_kl_by_hand(model, ref, prompts, responses), abs=1e-4)


def test_run_eval_passes_each_task_its_own_options(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setitem(TASKS, "fake", lambda model_dir, data="world", batch_size=8: seen.update(
        data=data, batch_size=batch_size) or {"ok": 1.0})
    monkeypatch.setitem(TASKS, "fake-kw", lambda model_dir, **kw: seen.update(kw=kw) or {})
    out = run_eval(tmp_path, "fake", data="x", batch_size=None, ref="somewhere", limit=3)
    assert out == {"task": "fake", "ok": 1.0} and seen == {"data": "x", "batch_size": 8}
    run_eval(tmp_path, "fake-kw", ref="r", limit=None)
    assert seen["kw"] == {"ref": "r"}
    with pytest.raises(ValueError, match="unknown eval task"):
        run_eval(tmp_path, "nope")


def test_eval_cli_world_tasks(model_dir, capsys):
    people = ["--people", str(WORLD["n_people"]), "--world-seed", str(WORLD["seed"])]
    assert main(["eval", "--model", str(model_dir), "--task", "world-qa", "--limit", "3", "--max-new-tokens", "6",
                 *people]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == "world-qa" and out["n_questions"] == 9
    assert {"qa_acc_seen", "qa_acc_heldout", "idk_rate", "invented_rate", "gold_reward", "gold_reward_seen",
            "gold_reward_heldout", "gold_reward_unknown"} <= set(out)
    assert out["world_seed"] == WORLD["seed"] and out["world_people"] == WORLD["n_people"]
    assert main(["eval", "--model", str(model_dir), "--task", "world-gold", "--limit", "2", "--max-new-tokens", "6",
                 "--ref", str(model_dir), *people]) == 0
    gold = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gold["task"] == "world-gold" and gold["kl"] == pytest.approx(0, abs=1e-6)
    assert {"gold_reward", "gold_reward_seen", "gold_reward_heldout", "gold_reward_unknown"} <= set(gold)
