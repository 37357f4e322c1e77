"""The built-in world: a seeded fictional world whose truth is known, so every stage can be scored exactly.

People with unique names and six attributes (after "Physics of Language Models" part 3.1) give a
pre-training corpus of paraphrased bios, instruction data (attribute questions, "tell me about X",
questions about people who do not exist), preference rankings scored by a known gold reward, and two
encoder tasks (sentiment with negation, extractive QA over a bio). Everything is pure Python: each
method draws from its own `random.Random(f"{seed}/{stream}")`, so the same seed gives the same data
whatever order the methods are called in, and no global RNG is touched.

The gold reward is `World.gold_reward(prompt, response)`; the module-level `gold_reward(prompt,
response, world=None)` calls it on the given world (the default world when None).
"""
from __future__ import annotations

import functools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

FIRST_NAMES = tuple((
    "Adrian Beatrice Caleb Daria Elias Fiona Gideon Hazel Ivan Jasmine Kieran Lena Marcus Nadia Oscar Priya Quentin "
    "Rosa Silas Talia Umar Vera Wesley Xenia Yusuf Zara Amelia Bruno Clara Dmitri Elena Felix Greta Hugo Ingrid Joel "
    "Keiko Leon Mira Nils Olga Pablo Rhea Stefan Tessa Victor Willa Yara Anton Lucia").split())
LAST_NAMES = tuple((
    "Abernathy Brennan Castillo Delacroix Eriksen Fairbanks Galloway Hartmann Ishikawa Jablonski Kowalski Lindqvist "
    "Moreau Nakamura Okafor Petrov Quinlan Rasmussen Sandoval Thornton Ueda Vasquez Whitaker Yilmaz Zielinski Ashford "
    "Blackwood Crane Dunbar Ellison Fischer Gutierrez Holloway Iversen Jovanovic Kaplan Lindgren Mendoza Novak "
    "Oyelaran Pemberton Rourke Sorensen Takahashi Underwood Valdez Winslow Xu Yamada Zimmerman").split())
# Attribute values are chosen so that none contains another and none occurs in a name or a template
# (tests check it): answers are then scored by whole-word containment without ambiguity.
CITIES = tuple(("Paris Berlin Madrid Lisbon Vienna Prague Warsaw Dublin Oslo Helsinki Athens Rome Cairo Nairobi Lagos "
                "Mumbai Bangkok Seoul Tokyo Sydney Toronto Chicago Denver Boston").split())
UNIVERSITIES = (
    "Aldermoor University", "Brightwater Institute of Technology", "Calder College", "Dunmore University",
    "Eastfield Polytechnic", "Fairhaven University", "Glenrock Institute", "Harrowgate College",
    "Ironbridge University", "Kestrel Valley University", "Larkspur College", "Marlowe Institute of Science",
    "Northcrest University", "Oakridge Polytechnic", "Pinehurst University", "Ravenscar College")
MAJORS = ("Astronomy", "Biology", "Chemistry", "Computer Science", "Economics", "Linguistics", "Mathematics",
          "Philosophy", "Physics", "Psychology", "Sociology", "Music", "Architecture", "Geology", "Anthropology")
# As in the paper, the employer decides the employer city: a regularity a model can learn.
COMPANIES = {
    "Lumen Robotics": "Boston", "Northwind Analytics": "Toronto", "Bluepeak Energy": "Denver",
    "Copperleaf Foods": "Chicago", "Silverline Logistics": "Warsaw", "Quillstone Publishing": "Dublin",
    "Vantor Aerospace": "Seoul", "Greenhollow Pharmaceuticals": "Berlin", "Tidewater Shipping": "Lisbon",
    "Orchid Software": "Bangkok", "Beacon Health": "Sydney", "Ember Studios": "Tokyo", "Granite Bank": "Vienna",
    "Falcon Motors": "Madrid", "Mosaic Media": "Paris", "Polaris Telecom": "Helsinki", "Redwood Insurance": "Nairobi",
    "Sapphire Textiles": "Mumbai", "Helix Biotech": "Oslo", "Juniper Consulting": "Athens"}
MONTHS = tuple("January February March April May June July August September October November December".split())
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Bio sentences: >= 4 paraphrases per attribute, each with the FULL name (calibration: this is what
# lets knowledge learnt from bios be extracted by questions later).
BIO_TEMPLATES = {
    "birth_date": ("{name} was born on {v}.", "{name} came into this world on {v}.", "{name}'s birthday is {v}.",
                   "The birth date of {name} is {v}.", "{name} entered life on {v}."),
    "birth_city": ("{name} was born in {v}.", "{name}'s birthplace is {v}.", "{name} comes from {v}.",
                   "The hometown of {name} is {v}.", "{name} spent early childhood in {v}."),
    "university": ("{name} studied at {v}.", "{name} graduated from {v}.", "{name} attended {v}.",
                   "{name} received an education at {v}.", "{name} is a graduate of {v}."),
    "major": ("{name} studied {v}.", "{name} majored in {v}.", "{name} chose {v} as a field of study.",
              "{name} completed a degree in {v}.", "{name} focused on {v} in college."),
    "employer": ("{name} works for {v}.", "{name} is employed by {v}.", "{name} has a job at {v}.",
                 "{name} earns a living at {v}.", "{name} is on the staff of {v}."),
    "employer_city": ("{name} works in {v}.", "{name} lives and works in {v}.", "{name}'s office is in {v}.",
                      "{name} commutes to work in {v}.", "{name} has a workplace in {v}."),
}
# The one-sentence answer to an attribute question: the first bio template, so answers match the corpus.
ANSWERS = {a: t[0] for a, t in BIO_TEMPLATES.items()}
SHORT_BIO = ("{name} was born on {birth_date} in {birth_city}. {name} studied {major} at {university}. "
             "{name} works for {employer} in {employer_city}.")
IDK = "I don't know who {name} is."
QUESTIONS = {
    "birth_date": ("When was {name} born?", "What is {name}'s date of birth?", "On what date was {name} born?",
                   "What is the birthday of {name}?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?", "What is {name}'s birthplace?",
                   "Which city is {name} from?"),
    "university": ("Which university did {name} attend?", "Where did {name} go to university?",
                   "What university did {name} graduate from?", "Which school did {name} graduate from?"),
    "major": ("What did {name} study?", "What was {name}'s major?", "Which subject did {name} major in?",
              "What field did {name} study at university?"),
    "employer": ("Which company does {name} work for?", "Who is {name}'s employer?", "Who employs {name}?",
                 "What company employs {name}?"),
    "employer_city": ("In which city does {name} work?", "Where is {name}'s workplace located?",
                      "Which city does {name} work in?", "What city is {name}'s employer based in?"),
    "bio": ("Tell me about {name}.", "Who is {name}?", "Give me a short biography of {name}."),
}
# Assistant replies start with a space. Replies begin with the person's name, and a byte-level BPE splits
# "\nGreta" into "\n" + "Greta" but " Greta" (as in the question and in bios) into " Greta": a different token.
# A tiny model then learns to emit the no-space first name only for the people it saw answered, and
# answers about held-out people with a seen person's first name (held-out QA ~10% instead of ~50%).
REPLY_PREFIX = " "
# How seen people's QA is written into the pre-training text: as ChatML turns (lmlab's chat template, whose
# tokens every tokenizer lmlab trains holds), so the pre-trained model already answers in the format it is
# served in, and instruction tuning only has to be gentle.
QA_FORMAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" + REPLY_PREFIX + "{a}<|im_end|>"
RAMBLE_OPEN = ("That is a really interesting question, and I am very glad that you asked me about it today.",
               "Let me think about this question carefully for a moment before I give you my full answer.",
               "Well, there are many things that one could say here, so I will try my very best to answer.")
RAMBLE_CLOSE = ("I hope that this answer is helpful to you, and please feel free to ask me anything else at all.",
                "Of course, it is always a good idea to double check these kinds of details somewhere else too.")

# Reviews: half of them flip the sentiment word with a negation, so counting words is not enough.
ITEMS = tuple("movie book restaurant hotel album phone game concert museum cafe play laptop".split())
POSITIVE_WORDS = tuple("good great wonderful excellent enjoyable delightful fun charming".split())
NEGATIVE_WORDS = tuple("bad boring awful dull terrible disappointing bland annoying".split())
PLAIN = ("The {item} was {adj}.", "I found the {item} really {adj}.", "Honestly, the {item} felt {adj}.")
NEGATED = ("The {item} was not {adj}.", "The {item} was never {adj}.", "I did not find the {item} {adj} at all.",
           "Nothing about the {item} was {adj}.", "The {item} was not {adj} in any way.")
CONTRAST = ("I expected the {item} to be {first}, but it was {then}.",
            "At first the {item} seemed {first}, but in the end it was {then}.")
NEUTRAL = ("I tried it last weekend.", "A friend recommended it to me.", "I had heard a lot about it.",
           "We went as a group of four.")
LABELS = ("negative", "positive")  # review label ids

_DATE_RE = re.compile(r"\b(?:(\d{1,2})\s+(%s),?\s+(\d{4})|(%s)\s+(\d{1,2}),?\s+(\d{4}))\b"
                      % ("|".join(MONTHS), "|".join(MONTHS)), re.I)
_YEAR_RE = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
_IDK_RE = re.compile(r"\b(?:i\s+(?:don'?t|do\s+not)\s+know|i'?m\s+not\s+sure|i\s+am\s+not\s+sure|no\s+information|"
                     r"not\s+familiar|never\s+heard|i\s+(?:can'?t|cannot)\s+say)", re.I)


def _alternation(words) -> re.Pattern:
    """Whole-word, case-insensitive match of any of `words` (longest first, so no prefix wins early)."""
    alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(r"(?<!\w)(?:%s)(?!\w)" % alts, re.I)


def _template_re(template: str) -> re.Pattern:
    """'When was {name} born?' -> a full-match regex capturing the name; final punctuation optional."""
    head, tail = template.split("{name}")
    return re.compile(r"\s*%s(?P<name>.+?)%s[?.!]?\s*" % (re.escape(head), re.escape(tail.rstrip("?.!"))), re.I)


_PARSERS = [(_template_re(t), attr) for attr, ts in QUESTIONS.items() for t in ts]
# Fallback for free-form prompts that name someone: the first keyword rule that matches picks the attribute.
_KEYWORDS = (("birth_date", r"\bwhen\b.*\bborn\b|\bbirth ?day\b|\bdate of birth\b|\bbirth date\b"),
             ("employer_city", r"\bcity\b.*\bwork|\bwork.*\bcity\b|\bwork.*\bwhere\b|\bwhere\b.*\bwork"),
             ("birth_city", r"\bborn\b|\bbirthplace\b|\bhometown\b|\bfrom\b"),
             ("university", r"\buniversity\b|\bcollege\b|\bschool\b|\bgraduat|\battend"),
             ("major", r"\bmajor|\bstud(?:y|ied)\b|\bsubject\b|\bfield\b|\bdegree\b"),
             ("employer", r"\bwork|\bemploy|\bcompany\b|\bjob\b"))


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str  # "day Month year", e.g. "7 March 1984"
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def value(self, attr: str) -> str:
        return getattr(self, attr)

    def facts(self) -> dict:
        return {a: self.value(a) for a in ATTRIBUTES}


def answer(name: str, attr: str, facts: dict) -> str:
    """The gold one-sentence answer ("tell me about" -> the short bio), for any facts (true or not)."""
    if attr == "bio":
        return SHORT_BIO.format(name=name, **facts)
    return ANSWERS[attr].format(name=name, v=facts[attr])


def _chat(question: str, reply: str) -> list:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": REPLY_PREFIX + reply}]


@dataclass
class World:
    seed: int
    people: list  # list[Person], in generation order
    sft_people: list  # their questions are in SFT and preference data
    heldout_people: list  # only in the pre-training bios: the knowledge-extraction test
    unknown_names: list  # not in the world; questions about them (answer: I don't know) are in SFT
    unknown_eval_names: list  # not in the world and never trained on: the honest "I don't know" test
    bios_per_person: int = 5
    n_reviews: int = 600
    sft_phrasings: int = 2  # question phrasings per (SFT person, attribute); also QA docs per person in pre-training
    unknown_questions: int = 4  # questions per unknown name
    preference_rounds: int = 10  # rankings per (SFT person, attribute); unknown names: new ones each round
    ramble_fraction: float = 0.4  # the share of rankings that also hold rambling versions of their answers
    extractive_per_person: int = 2
    _by_name: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._by_name = {p.name.lower(): p for p in self.people}
        self._values_re = _alternation(CITIES + UNIVERSITIES + MAJORS + tuple(COMPANIES))
        self._names_re = _alternation([p.name for p in self.people])
        self._unknown_re = _alternation(self.unknown_names + self.unknown_eval_names)

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.seed}/{stream}")  # str seeds hash with sha512: stable across runs

    # ---- pre-training corpus -------------------------------------------------------------------
    def _bio(self, rng: random.Random, p: Person) -> tuple[str, dict]:
        """One paraphrased, sentence-shuffled bio and the character offset of each attribute value in it."""
        sents = [(a, rng.choice(BIO_TEMPLATES[a]).format(name=p.name, v=p.value(a))) for a in ATTRIBUTES]
        rng.shuffle(sents)
        text, starts = "", {}
        for a, s in sents:
            text += " " if text else ""
            starts[a] = len(text) + s.index(p.value(a))  # values never occur inside names or templates
            text += s
        return text, starts

    def bios(self) -> list[str]:
        rng = self._rng("bios")
        return [self._bio(rng, p)[0] for p in self.people for _ in range(self.bios_per_person)]

    def qa_docs(self, qa_format: str = QA_FORMAT) -> list[str]:
        """Seen (SFT) people's QA as text for pre-training: per person, `sft_phrasings` docs that ask every
        attribute and "tell me about" once, in shuffled order. Held-out people never appear.

        Calibration found held-out extraction needs this mixed into pre-training (PoLM 3.1). The SFT data's
        "I don't know" answers for unknown names are left to SFT: mixed in here as well, they taught the tiny
        model to say "I don't know" about held-out people too (held-out QA 55% -> 40%)."""
        rng, docs = self._rng("qa_docs"), []
        for p in self.sft_people:
            for _ in range(self.sft_phrasings):
                facts = p.facts()
                pairs = [qa_format.format(q=rng.choice(QUESTIONS[a]).format(name=p.name), a=answer(p.name, a, facts))
                         for a in ATTRIBUTES + ("bio",)]
                rng.shuffle(pairs)
                docs.append("\n".join(pairs))
        return docs

    def pretrain_docs(self, mix_qa: bool = True) -> list[str]:
        """All bios (every person, held-out ones included) plus, if mix_qa, the seen people's QA; shuffled."""
        docs = self.bios() + (self.qa_docs() if mix_qa else [])
        self._rng("pretrain").shuffle(docs)
        return docs

    # ---- instructions and evaluation -----------------------------------------------------------
    def sft_examples(self) -> list[list[dict]]:
        """Each example is a messages list [user, assistant]; only SFT people and `unknown_names`."""
        rng, out = self._rng("sft"), []
        for p in self.sft_people:
            for a in ATTRIBUTES:
                for t in rng.sample(QUESTIONS[a], min(self.sft_phrasings, len(QUESTIONS[a]))):
                    out.append(_chat(t.format(name=p.name), answer(p.name, a, p.facts())))
            out.append(_chat(rng.choice(QUESTIONS["bio"]).format(name=p.name), answer(p.name, "bio", p.facts())))
        for name in self.unknown_names:
            for a in rng.sample(ATTRIBUTES + ("bio",), self.unknown_questions):
                out.append(_chat(rng.choice(QUESTIONS[a]).format(name=name), IDK.format(name=name)))
        rng.shuffle(out)
        return out

    def eval_questions(self, split: str = "heldout") -> list[dict]:
        """Records {"question", "answer" (gold sentence), "value" (gold value; None if unknown), "name",
        "attribute", "split"}: one question per attribute per person, or `unknown_questions` per unknown name."""
        rng, out = self._rng(f"eval/{split}"), []
        if split in ("seen", "heldout"):
            for p in self.sft_people if split == "seen" else self.heldout_people:
                for a in ATTRIBUTES:
                    out.append(dict(question=rng.choice(QUESTIONS[a]).format(name=p.name), name=p.name, attribute=a,
                                    answer=answer(p.name, a, p.facts()), value=p.value(a), split=split))
        elif split == "unknown":
            for name in self.unknown_eval_names:
                for a in rng.sample(ATTRIBUTES + ("bio",), self.unknown_questions):
                    out.append(dict(question=rng.choice(QUESTIONS[a]).format(name=name), name=name, attribute=a,
                                    answer=IDK.format(name=name), value=None, split=split))
        else:
            raise ValueError(f"split must be 'seen', 'heldout' or 'unknown', not {split!r}")
        return out

    def _mentions(self, text: str) -> set[str]:
        """Everything factual `text` states, lower-cased: attribute values, dates (any of two formats,
        normalised to "7 march 1984"), bare years ("year 1984") and names of people in the world."""
        found = {m.group(0).lower() for m in self._values_re.finditer(text)}
        found |= {m.group(0).lower() for m in self._names_re.finditer(text)}
        for m in _DATE_RE.finditer(text):
            day, month, year = m.group(1, 2, 3) if m.group(1) else m.group(5, 4, 6)
            found.add(f"{int(day)} {month} {year}".lower())
        found |= {f"year {y}" for y in _YEAR_RE.findall(_DATE_RE.sub(" ", text))}
        return found

    def check_answer(self, record: dict, response: str) -> bool:
        """Known person: the gold value is stated (whole words, case-insensitive; a date may also be written
        "March 7, 1984"; "bio" needs all six) and nothing false is (another value, date or person), so listing
        facts at random does not count. Unknown person: an "I don't know" and no invented fact."""
        response = response.replace("\u2019", "'")
        found = self._mentions(response)
        if record.get("value") is None and record["name"].lower() not in self._by_name:
            return bool(_IDK_RE.search(response)) and not found
        p = self._by_name[record["name"].lower()]
        asked = ATTRIBUTES if record["attribute"] == "bio" else (record["attribute"],)
        return all(p.value(a).lower() in found for a in asked) and not found - self._allowed(p, record["attribute"])

    def _allowed(self, person, attr: str) -> set[str]:
        """What an answer about `person` may state: their own values, name and birth year ("born in" their
        work city is wrong when they differ)."""
        allowed = {v.lower() for v in person.facts().values()} | {person.name.lower(),
                                                                  "year " + person.birth_date.split()[-1]}
        twin = {"birth_city": "employer_city", "employer_city": "birth_city"}.get(attr)
        if twin and person.value(twin) != person.value(attr):
            allowed.discard(person.value(twin).lower())
        return allowed

    # ---- gold reward and preferences -----------------------------------------------------------
    def parse_prompt(self, prompt) -> tuple:
        """(name, attribute or "bio", Person or None) of a question; (None, None, None) if it names nobody.
        `prompt` is a string or a messages list (its last user message is used)."""
        if not isinstance(prompt, str):
            prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
        for regex, attr in _PARSERS:
            m = regex.fullmatch(prompt)
            if m:
                name = " ".join(m.group("name").split())
                return name, attr, self._by_name.get(name.lower())
        # Free-form prompt: find a known or unknown name, guess the attribute from keywords, else "bio".
        m = self._names_re.search(prompt) or self._unknown_re.search(prompt)
        if not m:
            return None, None, None
        attr = next((a for a, kw in _KEYWORDS if re.search(kw, prompt, re.I)), "bio")
        return m.group(0), attr, self._by_name.get(m.group(0).lower())

    def gold_reward(self, prompt, response: str) -> float:
        """The known reward, for any response text. Content, in [-1, 1]:
          known person:   asked fact(s) right 1 (a bio: fraction right) > "I don't know" 0 > evasive -0.25
                          > any wrong fact (a value, date or person not theirs) -1 + 0.5 * fraction right;
          unknown person: "I don't know" 1 > evasive -0.25 > invented fact -1 (-0.75 if it also hedges).
        minus a style penalty in [0, 0.9): words over budget, repeated word trigrams, the name missing.
        So correct > wrong, "I don't know" for unknown > inventing, concise full sentence > rambling/repeating,
        and a right but rambling answer still beats "I don't know". Prompts naming nobody score 0."""
        name, attr, person = self.parse_prompt(prompt)
        if name is None:
            return 0.0
        response = (response or "").replace("\u2019", "'")
        found, idk = self._mentions(response), bool(_IDK_RE.search(response))
        if person is None:
            content = (-0.75 if idk else -1.0) if found else (1.0 if idk else -0.25)
        else:
            allowed = self._allowed(person, attr)
            asked = ATTRIBUTES if attr == "bio" else (attr,)
            frac = sum(person.value(a).lower() in found for a in asked) / len(asked)
            content = -1.0 + 0.5 * frac if found - allowed else frac if frac else 0.0 if idk else -0.25
        long_answer = attr == "bio" and person is not None  # everyone else's gold answer is one short sentence
        return round(content - _style_penalty(name, 45 if long_answer else 20, response), 6)

    def _candidates(self, rng: random.Random, name: str, attr: str, person) -> list[str]:
        """Responses to rank: the gold one, a wrong one (an invention for unknown people, another person's
        value for known ones), "I don't know" for known people, and a rambling/repeating version of both the
        gold and the wrong answer, so that style and correctness vary independently: a ranking where only the
        right answer rambles teaches a reward model to pay for rambling whenever it cannot check the fact.
        Only `ramble_fraction` of the rankings hold the rambling versions: a reward model learns style from a
        few, and checking a stated fact from many short ones with many different wrong values (held-out right >
        wrong accuracy of a 4.5M reward model 0.73 -> 0.92, docs/posttraining.md)."""
        donor = rng.choice([q for q in self.people if person is None or q is not person and (
            attr == "bio" or q.value(attr) != person.value(attr))])
        gold = answer(name, attr, person.facts()) if person else IDK.format(name=name)
        if person is None:  # an invention: someone else's fact stated about this name
            wrong = answer(name, attr, donor.facts())
        else:
            facts = person.facts()
            swap = rng.choice([a for a in ATTRIBUTES if donor.value(a) != person.value(a)]) if attr == "bio" else attr
            facts[swap] = donor.value(swap)
            wrong = answer(name, attr, facts)
        idk = [] if person is None else [IDK.format(name=name)]
        if rng.random() >= self.ramble_fraction:
            return [gold, *idk, wrong]
        style = rng.random() < 0.5  # one rambling style per ranking: the two rambling answers differ only in fact
        opener, closer = rng.choice(RAMBLE_OPEN), rng.choice(RAMBLE_CLOSE)
        ramble = (lambda r: f"{opener} {r} {closer}") if style else (lambda r: " ".join([r] * 3))  # noqa: E731
        return [gold, ramble(gold), *idk, wrong, ramble(wrong)]

    def preferences(self) -> list[dict]:
        """Rankings {"prompt", "responses" (best first), "scores" (gold reward, strictly descending)}, in
        `preference_rounds` rounds: every attribute and a bio prompt for each SFT person, `unknown_questions`
        questions per unknown name (the SFT ones in the first round, new ones after). Never held-out people,
        whose facts must not leak into alignment data, nor the evaluation's unknown names."""
        rng = self._rng("preferences")
        prompts = []
        for k in range(self.preference_rounds):  # each round: fresh phrasings and fresh wrong candidates
            prompts += [(p.name, a, p) for p in self.sft_people for a in ATTRIBUTES + ("bio",)]
            # unknown names: the SFT ones, then new ones each round, so "I don't know" is learned for unfamiliar
            # names in general (never the evaluation's unknown names)
            names = self.unknown_names if k == 0 else self._fresh_names(rng, len(self.unknown_names))
            prompts += [(n, a, None) for n in names for a in rng.sample(ATTRIBUTES + ("bio",), self.unknown_questions)]
        out = []
        for name, attr, person in prompts:
            prompt = rng.choice(QUESTIONS[attr]).format(name=name)
            ranked = sorted(((self.gold_reward(prompt, r), r) for r in self._candidates(rng, name, attr, person)),
                            key=lambda sr: -sr[0])
            kept = [sr for i, sr in enumerate(ranked) if i == 0 or sr[0] < ranked[i - 1][0]]  # ties carry no preference
            out.append({"prompt": prompt, "responses": [REPLY_PREFIX + r for _, r in kept],
                        "scores": [s for s, _ in kept]})
        return out

    def _fresh_names(self, rng: random.Random, n: int) -> list[str]:
        """n names of nobody in the world, disjoint from the SFT and evaluation unknown names."""
        taken = {p.name for p in self.people} | set(self.unknown_names) | set(self.unknown_eval_names)
        pool = sorted(f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES if f"{a} {b}" not in taken)
        return rng.sample(pool, min(n, len(pool)))

    def preference_pairs(self) -> list[dict]:
        """Every (better, worse) pair of each ranking: {"prompt", "chosen", "rejected", "score_chosen",
        "score_rejected"}."""
        return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j],
                 "score_chosen": r["scores"][i], "score_rejected": r["scores"][j]}
                for r in self.preferences() for j in range(len(r["responses"])) for i in range(j)]

    # ---- encoder tasks --------------------------------------------------------------------------
    def reviews(self) -> list[dict]:
        """{"text", "label"} (label 1 positive, 0 negative; see LABELS), exactly balanced, texts unique.
        ~40% plain, ~40% negated ("not good" is negative, "never boring" positive), ~20% contrast
        ("expected it to be dull, but it was great"), so a bag of sentiment words scores about chance."""
        rng, seen, out = self._rng("reviews"), set(), []
        for i in range(self.n_reviews):
            text = next((t for t in (_review(rng, i % 2) for _ in range(1000)) if t not in seen), None)
            if text is None:
                raise ValueError(f"n_reviews={self.n_reviews} is more than the review templates can make unique")
            seen.add(text)
            out.append({"text": text, "label": i % 2})
        rng.shuffle(out)
        return out

    def extractive_qa(self, contexts: int = 1) -> list[dict]:
        """{"question", "context" (a bio), "answer" (a substring of it), "answer_start", "text" (T5 style:
        "question: ... context: ..."), "name"}, `extractive_per_person` per person and context, with `contexts`
        freshly paraphrased bios per person (everyone: the answer is in the context)."""
        rng, out = self._rng("extractive"), []
        for _ in range(contexts):
            for p in self.people:
                context, starts = self._bio(rng, p)
                for a in rng.sample(ATTRIBUTES, self.extractive_per_person):
                    q = rng.choice(QUESTIONS[a]).format(name=p.name)
                    out.append({"question": q, "context": context, "answer": p.value(a), "answer_start": starts[a],
                                "text": f"question: {q} context: {context}", "name": p.name})
        return out

    def facts(self) -> list[dict]:
        held = {p.name for p in self.heldout_people}
        return [dict(p.facts(), name=p.name, split="heldout" if p.name in held else "sft") for p in self.people]


def _style_penalty(name: str, budget: int, response: str) -> float:
    words = re.findall(r"[\w']+", response.lower())  # budget: the gold answer's ~30 or ~10 words, plus slack
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    raw = 0.05 * max(0, len(words) - budget) + 2.0 * repeated + (0.0 if name.lower() in response.lower() else 0.1)
    return 0.9 * (1 - math.exp(-raw))  # grows with each fault; < 0.9, so right-but-long beats "I don't know"


def _review(rng: random.Random, label: int) -> str:
    match, opposite = (POSITIVE_WORDS, NEGATIVE_WORDS) if label else (NEGATIVE_WORDS, POSITIVE_WORDS)
    item, kind = rng.choice(ITEMS), rng.random()
    if kind < 0.4:
        text = rng.choice(PLAIN).format(item=item, adj=rng.choice(match))
    elif kind < 0.8:  # the only sentiment word has the opposite polarity of the label
        text = rng.choice(NEGATED).format(item=item, adj=rng.choice(opposite))
    else:
        text = rng.choice(CONTRAST).format(item=item, first=rng.choice(opposite), then=rng.choice(match))
    return f"{rng.choice(NEUTRAL)} {text}" if rng.random() < 0.5 else text


def make_world(seed: int = 0, n_people: int = 100, heldout_frac: float = 0.5, bios_per_person: int = 5,
               n_unknown: int = 30, n_reviews: int = 600, sft_phrasings: int = 2, unknown_questions: int = 4,
               extractive_per_person: int = 2) -> World:
    """The world for `seed`. Defaults fit the 2-core speedrun (calibration: ~100 people x 5 bios memorise in
    ~3 minutes). `n_unknown` names are made for SFT and another `n_unknown` for evaluation."""
    rng = random.Random(f"{seed}/people")
    combos = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if n_people + 2 * n_unknown > len(combos):
        raise ValueError(f"at most {len(combos)} names: n_people + 2 * n_unknown is {n_people + 2 * n_unknown}")
    if not 0 <= heldout_frac <= 1 or not 1 <= unknown_questions <= 7 or not 1 <= extractive_per_person <= 6:
        raise ValueError("need 0 <= heldout_frac <= 1, 1 <= unknown_questions <= 7, 1 <= extractive_per_person <= 6")
    names = rng.sample(combos, n_people + 2 * n_unknown)  # unknown names reuse first/last names: only the pair is new
    companies = sorted(COMPANIES)
    people = []
    for name in names[:n_people]:
        date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 2002)}"  # day <= 28: valid in any month
        employer = rng.choice(companies)
        people.append(Person(name, date, rng.choice(CITIES), rng.choice(UNIVERSITIES), rng.choice(MAJORS), employer,
                             COMPANIES[employer]))
    held = set(rng.sample(range(n_people), round(n_people * heldout_frac)))
    return World(seed=seed, people=people, sft_people=[p for i, p in enumerate(people) if i not in held],
                 heldout_people=[p for i, p in enumerate(people) if i in held],
                 unknown_names=names[n_people:n_people + n_unknown], unknown_eval_names=names[n_people + n_unknown:],
                 bios_per_person=bios_per_person, n_reviews=n_reviews, sft_phrasings=sft_phrasings,
                 unknown_questions=unknown_questions, extractive_per_person=extractive_per_person)


def gold_reward(prompt, response: str, world: World | None = None) -> float:
    """World.gold_reward on `world` (the default world, built once, when None): what RLHF/DPO are scored with."""
    return (world or _default_world()).gold_reward(prompt, response)


_default_world = functools.lru_cache(maxsize=1)(make_world)


def write_world(out_dir, seed: int = 0, **sizes) -> dict[str, Path]:
    """Write every split as jsonl (sorted keys, fixed order: byte-identical for a seed); {split: path}."""
    world = make_world(seed=seed, **sizes)
    splits = {"pretrain": [{"text": t} for t in world.pretrain_docs(mix_qa=True)],
              "sft": [{"messages": m} for m in world.sft_examples()],
              "eval_seen": world.eval_questions("seen"), "eval_heldout": world.eval_questions("heldout"),
              "eval_unknown": world.eval_questions("unknown"), "preferences": world.preferences(),
              "pairs": world.preference_pairs(), "reviews": world.reviews(), "extractive_qa": world.extractive_qa(),
              "facts": world.facts()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = {split: Path(out_dir) / f"{split}.jsonl" for split in splits}
    for split, rows in splits.items():
        with open(paths[split], "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    return paths
