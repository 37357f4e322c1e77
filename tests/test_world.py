"""The built-in world: determinism, known truth in every split, the split boundaries, the gold reward's
ordering, and the encoder tasks (negation that defeats word counting, extractive answers in their context)."""
import json
import os
import re
import subprocess
import sys

import pytest

from lmlab.data import world as W
from lmlab.data.world import ATTRIBUTES, gold_reward, make_world, write_world

SMALL = dict(n_people=30, n_unknown=10, n_reviews=100)
SPLITS = {"pretrain", "sft", "eval_seen", "eval_heldout", "eval_unknown", "preferences", "pairs", "reviews",
          "extractive_qa", "facts"}


@pytest.fixture(scope="module")
def world():
    return make_world()


def _contains(value, text):
    return re.search(r"(?<!\w)%s(?!\w)" % re.escape(value), text, re.I) is not None


def test_write_world_is_deterministic(tmp_path):
    a, b, c = (write_world(tmp_path / d, seed=s, **SMALL) for d, s in (("a", 0), ("b", 0), ("c", 1)))
    assert set(a) == SPLITS and all(p.name == f"{k}.jsonl" for k, p in a.items())
    for k in SPLITS:
        data = a[k].read_bytes()
        assert data and data == b[k].read_bytes(), k
        for line in data.decode().splitlines():  # canonical json: sorted keys, one object per line
            assert json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False) == line
    assert all(a[k].read_bytes() != c[k].read_bytes() for k in SPLITS)
    assert set(json.loads(a["pretrain"].read_text().splitlines()[0])) == {"text"}
    assert set(json.loads(a["sft"].read_text().splitlines()[0])) == {"messages"}
    # Another process with another hash seed writes the same bytes (no dependence on set order or hash()).
    code = f"from lmlab.data.world import write_world; write_world({str(tmp_path / 'd')!r}, seed=0, **{SMALL!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert all((tmp_path / "d" / f"{k}.jsonl").read_bytes() == a[k].read_bytes() for k in SPLITS)


def test_people_names_and_attribute_pools(world):
    names = [p.name for p in world.people]
    assert len(world.people) == 100 and len(set(names)) == 100
    assert len(world.heldout_people) == 50 and len(world.sft_people) == 50
    assert {p.name for p in world.sft_people} | {p.name for p in world.heldout_people} == set(names)
    unknown = world.unknown_names + world.unknown_eval_names
    assert len(unknown) == 60 and len(set(unknown)) == 60 and not set(unknown) & set(names)
    for p in world.people:
        assert p.birth_city in W.CITIES and p.university in W.UNIVERSITIES and p.major in W.MAJORS
        assert W.COMPANIES[p.employer] == p.employer_city
        day, month, year = p.birth_date.split()
        assert int(day) in range(1, 29) and month in W.MONTHS and 1900 < int(year) < 2010
    assert make_world(seed=1).people != world.people and make_world(seed=0).people == world.people


def test_values_are_unambiguous():
    """Scoring by whole-word containment needs: no value inside another, a name, or any template text."""
    values = W.CITIES + W.UNIVERSITIES + W.MAJORS + tuple(W.COMPANIES) + W.MONTHS
    texts = [t for ts in list(W.BIO_TEMPLATES.values()) + list(W.QUESTIONS.values()) for t in ts]
    texts += [W.SHORT_BIO, W.IDK, W.QA_FORMAT, *W.RAMBLE_OPEN, *W.RAMBLE_CLOSE, *W.FIRST_NAMES, *W.LAST_NAMES]
    for v in values:
        assert not any(_contains(v, o) for o in values if o != v), v
        assert not any(_contains(v, t) for t in texts), v


def test_template_counts_and_questions_parse_back(world):
    assert all(len(W.BIO_TEMPLATES[a]) >= 4 and len(W.QUESTIONS[a]) >= 3 for a in ATTRIBUTES)
    p = world.people[0]
    for attr, templates in W.QUESTIONS.items():
        for t in templates:
            assert world.parse_prompt(t.format(name=p.name)) == (p.name, attr, p), t
            assert world.parse_prompt(t.format(name="Nobody Known")) == ("Nobody Known", attr, None), t
    assert world.parse_prompt(f"hey, where was {p.name.lower()} born again?")[1:] == ("birth_city", p)
    assert world.parse_prompt([{"role": "user", "content": f"Who employs {p.name}?"}])[1] == "employer"
    assert world.parse_prompt("What is the capital of France?") == (None, None, None)


def test_bios_have_full_name_in_every_sentence(world):
    bios = world.bios()
    assert len(bios) == 100 * world.bios_per_person
    for i, bio in enumerate(bios):
        p = world.people[i // world.bios_per_person]
        sentences = re.split(r"(?<=\.)\s+", bio)
        assert len(sentences) == 6 and all(p.name in s for s in sentences), bio
        assert all(p.value(a) in bio for a in ATTRIBUTES)
    per_person = bios[:world.bios_per_person]
    assert len(set(per_person)) == len(per_person)  # paraphrased, not copied


def test_pretrain_docs_mix_seen_qa_only(world):
    assert sorted(world.pretrain_docs(mix_qa=False)) == sorted(world.bios())
    mixed = world.pretrain_docs(mix_qa=True)
    qa = [d for d in mixed if d.startswith("<|im_start|>user\n")]  # the SFT questions as ChatML turns
    assert len(mixed) == len(world.bios()) + len(qa)
    assert len(qa) == len(world.sft_people) * world.sft_phrasings
    seen = {p.name for p in world.sft_people}
    for doc in qa:
        turns = re.findall(r"<\|im_start\|>(user|assistant)\n(.*?)<\|im_end\|>", doc)
        name, _, person = world.parse_prompt(turns[0][1])
        assert name in seen, doc
        assert [r for r, _ in turns] == ["user", "assistant"] * (len(ATTRIBUTES) + 1), doc  # + "tell me about"
        for (_, q), (_, a) in zip(turns[::2], turns[1::2]):
            assert a.startswith(W.REPLY_PREFIX) and world.parse_prompt(q)[0] == name
            assert world.check_answer({"name": name, "attribute": world.parse_prompt(q)[1], "value": "known"}, a)
    held_text = "\n".join(qa)
    assert not any(p.name in held_text for p in world.heldout_people)
    assert all(any(p.name in d for d in mixed) for p in world.heldout_people)  # their bios are there


def test_sft_answers_are_true_and_heldout_people_absent(world):
    examples = world.sft_examples()
    assert all([m["role"] for m in ex] == ["user", "assistant"] for ex in examples)
    unknown = 0
    for ex in examples:
        q, a = ex[0]["content"], ex[1]["content"]
        assert a.startswith(W.REPLY_PREFIX)  # see REPLY_PREFIX: the name after it tokenizes as in the question
        a = a[len(W.REPLY_PREFIX):]
        name, attr, person = world.parse_prompt(q)
        if person is None:
            assert name in world.unknown_names and a == W.IDK.format(name=name)
            unknown += 1
            continue
        asked = ATTRIBUTES if attr == "bio" else (attr,)
        assert all(person.value(x) in a for x in asked) and a.startswith(person.name)
    assert unknown == len(world.unknown_names) * world.unknown_questions
    blob = json.dumps(examples)
    assert all(p.name not in blob for p in world.heldout_people)
    assert all(n not in blob for n in world.unknown_eval_names)
    assert all(p.name in blob for p in world.sft_people)
    prefs = json.dumps(world.preferences())
    assert all(p.name not in prefs for p in world.heldout_people)


@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_check_answer_known(world, split):
    records = world.eval_questions(split)
    people = world.sft_people if split == "seen" else world.heldout_people
    assert len(records) == 6 * len(people) and {r["name"] for r in records} == {p.name for p in people}
    for r in records:
        p = next(q for q in world.people if q.name == r["name"])
        assert r["value"] == p.value(r["attribute"]) and r["value"] in r["answer"]
        assert world.check_answer(r, r["answer"]) and world.check_answer(r, r["answer"].upper())
        other = next(q.value(r["attribute"]) for q in world.people if q.value(r["attribute"]) != r["value"])
        assert not world.check_answer(r, r["answer"].replace(r["value"], other))
        assert not world.check_answer(r, W.IDK.format(name=p.name))
    r = next(r for r in records if r["attribute"] == "birth_date")
    day, month, year = r["value"].split()
    assert world.check_answer(r, f"{r['name']} was born on {month} {day}, {year}.")  # the US order is fine too
    assert not world.check_answer(r, f"{r['name']} was born on 1{r['value']}.")  # "17 May" is not "7 May"


def test_check_answer_unknown(world):
    records = world.eval_questions("unknown")
    assert len(records) == len(world.unknown_eval_names) * world.unknown_questions
    p = world.people[0]
    for r in records:
        assert r["value"] is None and r["name"] in world.unknown_eval_names
        assert world.check_answer(r, r["answer"]) and world.check_answer(r, "Sorry, I do not know this person.")
        assert not world.check_answer(r, W.answer(r["name"], r["attribute"], p.facts()))  # invented
        hedge = f"I don't know who {r['name']} is, but maybe they were born in {p.birth_city}."
        assert not world.check_answer(r, hedge)
        assert not world.check_answer(r, f"{r['name']} is a person.")  # no invention, but no admission either


def test_preferences_are_ranked_by_gold_reward(world):
    rankings = world.preferences()
    per_round = 7 * len(world.sft_people) + world.unknown_questions * len(world.unknown_names)
    assert len(rankings) == world.preference_rounds * per_round
    rambling = 0
    for r in rankings:
        name, attr, person = world.parse_prompt(r["prompt"])
        scores = [world.gold_reward(r["prompt"], x) for x in r["responses"]]
        assert scores == r["scores"] and all(a > b for a, b in zip(scores, scores[1:], strict=False)), r
        # no candidate lost to a tie: right, ["I don't know",] wrong [+ the rambling right and wrong]
        assert len(r["responses"]) in ((3, 5) if person else (2, 4)), r
        rambling += len(r["responses"]) > 3 or not person and len(r["responses"]) == 4
        gold = W.answer(name, attr, person.facts()) if person else W.IDK.format(name=name)
        assert r["responses"][0] == W.REPLY_PREFIX + gold
        assert gold_reward(r["prompt"], r["responses"][0], world=world) == scores[0]
    assert abs(rambling / len(rankings) - world.ramble_fraction) < 0.05, rambling / len(rankings)
    pairs = world.preference_pairs()
    assert len(pairs) == sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rankings)
    assert all(p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"] for p in pairs)


def _descending(world, prompt, *responses):
    scores = [world.gold_reward(prompt, r) for r in responses]
    return all(a > b for a, b in zip(scores, scores[1:], strict=False))


def test_gold_reward_on_hand_written_responses(world):
    p = next(x for x in world.people if x.birth_city != x.employer_city)
    q = next(x for x in world.people if x.birth_city not in (p.birth_city, p.employer_city))
    ask = f"Where was {p.name} born?"
    right, wrong = f"{p.name} was born in {p.birth_city}.", f"{p.name} was born in {q.birth_city}."
    idk = W.IDK.format(name=p.name)
    ramble = (f"Well, that is a question I have been asked many times before by many people. {right} "
              f"There is a lot more that I could say about it, but I will stop here for now.")
    assert _descending(world, ask, right, ramble, idk, wrong)
    assert _descending(world, ask, right, " ".join([right] * 3), idk)
    assert _descending(world, ask, right, p.birth_city)  # a bare value is not a full sentence
    assert world.gold_reward(ask, right.lower()) == world.gold_reward(ask, right) == 1.0
    assert _descending(world, ask, idk, f"{p.name} was born in {p.birth_city} or {q.birth_city}.")  # listing
    assert _descending(world, ask, right, f"{q.name} was born in {p.birth_city}.")  # the right value, wrong person
    # A true city, but not the one asked about, is a wrong fact.
    assert world.gold_reward(ask, f"{p.name} was born in {p.employer_city}.") == world.gold_reward(ask, wrong)
    assert _descending(world, ask, idk, "Hello there.", wrong)
    stranger = world.unknown_eval_names[0]
    ask = [{"role": "user", "content": f"Which company does {stranger} work for?"}]
    honest, invented = W.IDK.format(name=stranger), f"{stranger} works for {p.employer}."
    assert _descending(world, ask, honest, " ".join([honest] * 4), invented)
    assert _descending(world, ask, "I'm not sure who that is.", f"I don't know, maybe {p.employer}.")
    bad = W.answer(p.name, "bio", dict(p.facts(), birth_city=q.birth_city))
    assert _descending(world, f"Tell me about {p.name}.", W.answer(p.name, "bio", p.facts()), right, idk, bad)
    assert world.gold_reward("What is the capital of France?", "Paris.") == 0.0
    assert gold_reward(f"Where was {p.name} born?", right) == 1.0  # module level, default world


def test_reviews_balanced_with_negation(world):
    reviews = world.reviews()
    assert len(reviews) == 600 and sum(r["label"] for r in reviews) == 300
    assert len({r["text"] for r in reviews}) == 600 and all(set(r) == {"text", "label"} for r in reviews)
    flipped = {0: 0, 1: 0}
    for r in reviews:
        m = re.search(r"\b(?:was not|was never|Nothing about the \w+ was|did not find the \w+) (\w+)", r["text"])
        if m:  # the sentiment word says the opposite of the label: only the negation gives the answer
            assert r["label"] == (1 if m.group(1) in W.NEGATIVE_WORDS else 0), r
            assert m.group(1) in W.POSITIVE_WORDS + W.NEGATIVE_WORDS
            flipped[r["label"]] += 1
    assert min(flipped.values()) >= 60 and any("never boring" in r["text"] for r in reviews)
    # Counting sentiment words is not enough: it is about chance here.
    def bow(text):
        words = re.findall(r"\w+", text)
        return int(sum(w in W.POSITIVE_WORDS for w in words) > sum(w in W.NEGATIVE_WORDS for w in words))
    assert sum(bow(r["text"]) == r["label"] for r in reviews) / len(reviews) < 0.7


def test_extractive_qa(world):
    items = world.extractive_qa()
    assert len(items) == 100 * world.extractive_per_person
    for it in items:
        _, attr, person = world.parse_prompt(it["question"])
        assert it["answer"] == person.value(attr) and it["answer"] in it["context"]
        assert it["context"][it["answer_start"]:it["answer_start"] + len(it["answer"])] == it["answer"]
        assert it["text"] == f"question: {it['question']} context: {it['context']}"
