"""The encoder families through the one loop: masked-LM and span-corruption pre-training (run directory,
files transformers loads, exact resume), classification and text-to-text fine-tuning (full and LoRA),
the embed and generate command lines, and clear errors."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

import lmlab
from lmlab.config import RunConfig, apply_overrides, preset
from lmlab.data.text import DataError
from lmlab.errors import ConfigError
from lmlab.train import pretrain, tasks

# a few steps of a very small model: these tests check plumbing, test_encoder_learning.py checks learning
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "train.batch_size=4", "train.seq_len=64", "train.eval_every=3",
         "train.eval_batches=2", "train.save_every=3", "train.warmup_steps=2", "data.vocab_size=600"]


def pretrain_config(family, steps=6, extra=()):
    d = {"model": preset("tiny", family).to_dict(), "data": {"source": "world", "world_people": 20}}
    return RunConfig.from_dict(apply_overrides(d, [*SMALL, f"train.max_steps={steps}", *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for family in ("encoder", "encoder-decoder"):
        d = tmp_path_factory.mktemp(family)
        summary = pretrain.run(pretrain_config(family), d, show_progress=False)
        out[family] = (d, summary)
    return out


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["encoder", "encoder-decoder"])
def test_pretrain_run_directory(runs, family):
    """The run directory of the design (config, metrics with eval lines, checkpoints, final/, report) and a
    validation loss below the uniform guess over the vocabulary."""
    d, summary = runs[family]
    for name in ("config.yaml", "metrics.jsonl", "report.json", "final/config.json", "final/model.safetensors",
                 "checkpoints/step_000006/trainer_state.json"):
        assert (d / name).exists(), name
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("loss" in r for r in rows)
    report = json.loads((d / "report.json").read_text())
    assert report["family"] == family and report["steps"] == 6
    vocab = lmlab.load_tokenizer(d / "final").vocab_size
    assert summary["val_loss"] < torch.log(torch.tensor(float(vocab))).item()


def test_pretrained_bert_loads_in_transformers(runs):
    """final/ of masked-LM pre-training is a BertForMaskedLM whose logits equal lmlab's, with its WordPiece tokenizer."""
    d = runs["encoder"][0] / "final"
    ours, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(d).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    text = "Ada Lovelace was born in Paris."
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"] and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x) - hf(input_ids=x).logits).abs().max() <= 1e-4


def test_pretrained_t5_loads_in_transformers(runs):
    """final/ of span-corruption pre-training is a T5ForConditionalGeneration with equal logits; its tokenizer has
    the sentinels and ends a text with </s> (no bos), as T5's does."""
    d = runs["encoder-decoder"][0] / "final"
    ours, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    ids = tok.encode("Ada Lovelace was born in Paris.")
    assert ids[-1] == tok.eos_token_id and ids[0] != tok.bos_token_id
    assert tok.token_to_id("<extra_id_0>") is not None and tok.token_to_id("<extra_id_99>") is not None
    x, dec = torch.tensor([ids]), torch.tensor([[ours.config.decoder_start_token_id, 5, 9, 7]])
    with torch.no_grad():
        assert (ours(x, decoder_input_ids=dec) - hf(input_ids=x, decoder_input_ids=dec).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["encoder", "encoder-decoder"])
def test_resume_is_exact(tmp_path, runs, family):
    """Stopped after step 3 and resumed, a run ends with the same weights as one run straight through: the
    masks and spans are drawn from the loader's position, which the checkpoint holds. (Both runs use one
    tokenizer: HF tokenizers' WordPiece trainer breaks ties in hash order, so two trainings can differ.)"""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    rc = lambda: pretrain_config(family, extra=[f"data.tokenizer={runs[family][0] / 'final'}"])  # noqa: E731
    pretrain.run(rc(), straight, show_progress=False)
    pretrain.run(rc(), resumed, stop_at=3, show_progress=False)
    assert not (resumed / "final").exists()
    pretrain.run(rc(), resumed, resume=True, show_progress=False)
    a, b = lmlab.load_model(straight / "final"), lmlab.load_model(resumed / "final")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_whole_word_masking_selects_whole_words(runs):
    """data.whole_word_mask: a WordPiece continuation (##...) is selected exactly when the token before it is."""
    from lmlab.train.objective_loaders import mlm_corrupter
    tok = lmlab.load_tokenizer(runs["encoder"][0] / "final")
    text = " ".join(["unbelievably extraordinary internationalisation"] * 40)
    window = torch.tensor([tok.encode(text, add_special_tokens=False)[:120]] * 8)
    assert any(tok.id_to_token(i).startswith("##") for i in window[0].tolist())
    _, labels = mlm_corrupter(tok, tok.vocab_size, 0.3, whole_word=True)(window, [0, 0, 1])
    selected = labels != -100
    cont = torch.tensor([[tok.id_to_token(i).startswith("##") for i in row] for row in window.tolist()])
    follow = cont[:, 1:]
    assert selected.any() and torch.equal(selected[:, 1:][follow], selected[:, :-1][follow])


def test_span_targets_text_reaches_the_t5_objective(runs):
    """data.span_targets=text goes through pretrain's objective(): the same corrupted inputs as T5's targets, and
    each label row is the raw window plus </s> (padded with -100), so the decoder writes the whole text."""
    from lmlab.config import DataConfig
    from lmlab.train.objective_loaders import objective
    d = runs["encoder-decoder"][0] / "final"
    model, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    window = torch.tensor([tok.encode(t, add_special_tokens=False)[:24] for t in
                           ["Ada Brook was born in Lisbon and works as a baker there.",
                            "The museum was charming, but the hotel felt cold and the food was not good."]])
    spans_in, _, spans_labels = objective("encoder-decoder", model, tok, DataConfig())[0](window, 7)
    ids, _, labels = objective("encoder-decoder", model, tok, DataConfig(span_targets="text"))[0](window, 7)
    assert torch.equal(ids, spans_in) and not torch.equal(labels, spans_labels)
    for row, lab in zip(window.tolist(), labels.tolist()):
        assert [t for t in lab if t != -100] == row + [tok.eos_token_id]


# ------------------------------------------------------------------------------------------ fine-tuning
def task_config(task, extra=()):
    d = {section: dict(v) for section, v in tasks.DEFAULTS[task].items()}
    return RunConfig.from_dict(apply_overrides(d, ["train.max_steps=4", "train.batch_size=4", "train.eval_every=0",
                                                   "train.seq_len=64", *extra]))


def test_classify_from_jsonl_with_lora(runs, tmp_path):
    """String labels from a .jsonl file; with LoRA only the adapters and the new head train; final/ is a
    BertForSequenceClassification that transformers runs with lmlab's logits and labels."""
    data = tmp_path / "cls.jsonl"
    rows = [{"text": f"item {i} is {'great' if i % 3 else 'awful'}", "label": "pos" if i % 3 else "neg"}
            for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    rc = task_config("classify", ["lora.r=4", f"data.source={data}"])
    model = tasks.task_model("classify", runs["encoder"][0] / "final", rc, ["neg", "pos"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("classifier.", "backbone.pooler.")) for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable) and any("lora_" in n for n in trainable)
    out = tmp_path / "run"
    report = tasks.run(rc, runs["encoder"][0] / "final", out, "classify")["report"]
    assert report["val_examples"] == 8 and 0 <= report["accuracy"] <= 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    ours, tok = lmlab.load_model(out / "final"), lmlab.load_tokenizer(out / "final")
    x = torch.tensor([tok.encode("item 7 is great")])
    with torch.no_grad():
        assert (ours(x) - hf(input_ids=x).logits).abs().max() <= 1e-4


def test_seq2seq_generate_and_cli(runs, tmp_path):
    """Text-to-text fine-tuning on a .jsonl of input/target, then `lmlab generate` on the T5 (greedy and beams)
    prints what lmlab.generate returns."""
    data = tmp_path / "s2s.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"copy: {w}", "target": w}) for w in ["red", "green", "blue"] * 8))
    out = tmp_path / "run"
    report = tasks.run(task_config("seq2seq", [f"data.source={data}"]), runs["encoder-decoder"][0] / "final", out,
                       "seq2seq")["report"]
    assert report["task"] == "seq2seq" and "exact_match" in report
    model, tok = lmlab.load_model(out / "final"), lmlab.load_tokenizer(out / "final")
    for beams in (1, 3):
        want = lmlab.generate(model, tok, "copy: red", max_new_tokens=6, num_beams=beams)
        res = cli("generate", "--model", str(out / "final"), "--prompt", "copy: red", "--max-new-tokens", "6",
                  "--num-beams", str(beams))
        assert res.returncode == 0, res.stderr
        assert res.stdout.rstrip("\n") == want


def test_seq2seq_lora_trains_adapters_only(runs, tmp_path):
    """LoRA on a T5 adapts its attention (q k v o) and MLP projections, nothing else; the merged final/ is a
    T5ForConditionalGeneration with lmlab's logits."""
    data = tmp_path / "s2s.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"copy: {w}", "target": w}) for w in ["red", "blue"] * 8))
    rc = task_config("seq2seq", ["lora.r=4", f"data.source={data}"])
    model = tasks.task_model("seq2seq", runs["encoder-decoder"][0] / "final", rc, None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"q", "k", "v", "o", "up_proj", "down_proj"}
    out = tmp_path / "run"
    tasks.run(rc, runs["encoder-decoder"][0] / "final", out, "seq2seq")
    ours = lmlab.load_model(out / "final")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
    x, dec = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[0, 9, 4]])
    with torch.no_grad():
        assert (ours(x, decoder_input_ids=dec) - hf(input_ids=x, decoder_input_ids=dec).logits).abs().max() <= 1e-4


def test_task_errors_name_the_problem(runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"txt": "oops", "label": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*text"):
        tasks.task_records("classify", str(bad))
    with pytest.raises(ConfigError, match="seq2seq needs an encoder-decoder"):
        tasks.task_model("seq2seq", runs["encoder"][0] / "final", task_config("seq2seq"), None)
    with pytest.raises(ConfigError, match="preset 't5-tiny' is a encoder-decoder model, not encoder"):
        preset("t5-tiny", "encoder")


def test_embed_command_equals_api(runs):
    """`lmlab embed` prints one normalised vector per text, equal to lmlab.embed."""
    d = runs["encoder"][0] / "final"
    texts = ["Ada Lovelace was born in Paris.", "A short one."]
    res = cli("embed", "--model", str(d), *texts)
    assert res.returncode == 0, res.stderr
    got = torch.tensor([json.loads(line) for line in res.stdout.splitlines()])
    want = lmlab.embed(lmlab.load_model(d), lmlab.load_tokenizer(d), texts)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)
    res = cli("embed", "--model", str(runs["encoder-decoder"][0] / "final"), "x")
    assert res.returncode != 0 and "needs an encoder" in res.stderr
