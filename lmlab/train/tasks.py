"""Fine-tuning the encoder families on a task, through the one loop: classification (BERT, RoBERTa) and
text-to-text (T5, BART).

    lmlab finetune --task classify --model runs/bert/final --data world --out runs/bert-sentiment
    lmlab finetune --task seq2seq  --model runs/t5/final   --data world --out runs/t5-qa

Data (.jsonl, one object per line), or the built-in world's tasks (`--data world`):
    classify:  {"text": ..., "label": 0 | "positive"}           world: the sentiment reviews
    seq2seq:   {"input": ..., "target": ...}                      world: extractive QA ("question: ... context:
                                                                  ...") -> the answer span, and "sentiment: REVIEW"
                                                                  -> positive / negative
    optional:  "task" (scores are reported per task), "group" (records held out together; the world's
               extractive questions are grouped by person, so no held-out answer can be recalled)
A seeded data.val_fraction of the examples is held out; the report gives held-out accuracy (classify) or
exact match of greedy answers (seq2seq), per world task. With lora.r > 0 only the adapters (and a
classifier's new head) train; final/ holds the merged model, as for the other stages.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, LoRAConfig, RunConfig
from lmlab.data.objectives import collate_span_corruption, pad_with_mask
from lmlab.data.text import DataError, iter_records
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.objective_loaders import seq2seq_loss
from lmlab.train.posttrain import ListLoader, write_report

DEFAULTS = {"classify": {"train": {"max_steps": 600, "batch_size": 16, "lr": 2e-4, "warmup_steps": 20,
                                   "weight_decay": 0.01, "eval_every": 100, "save_every": 0},
                         "data": {"val_fraction": 0.2}},
            # T5 with AdamW: lr 1e-3 (Adafactor's usual) stalls a tiny T5 even on copying; 3e-4 learns
            "seq2seq": {"train": {"max_steps": 600, "batch_size": 16, "lr": 3e-4, "warmup_steps": 20,
                                  "weight_decay": 0.0, "eval_every": 100, "save_every": 0},
                        "data": {"val_fraction": 0.1}}}
QA_CONTEXTS = 8  # world extractive QA: 8 paraphrased bios per person (4800 questions), so a T5 reads, not recalls
N_REVIEWS = 2400  # the world task's reviews: 600 are too few for a small encoder to learn negation from scratch
T5_LORA_TARGETS = ("q", "k", "v", "o", "up_proj", "down_proj", "gate_proj")


# ----------------------------------------------------------------------------------------------- data
def task_records(task: str, source, world_seed: int = 0, world_people: int = 100) -> list[dict]:
    """classify -> [{"text", "label" (str or int), "task"}]; seq2seq -> [{"input", "target", "task"}]."""
    if source == "world":
        from lmlab.data.world import LABELS, make_world
        w = make_world(seed=world_seed, n_people=world_people, extractive_per_person=6, n_reviews=N_REVIEWS)
        if task == "classify":
            return [{"text": r["text"], "label": LABELS[r["label"]], "task": "sentiment"} for r in w.reviews()]
        return ([{"input": q["text"], "target": q["answer"], "task": "extractive-qa", "group": q["name"]}
                 for q in w.extractive_qa(contexts=QA_CONTEXTS)]
                + [{"input": f"sentiment: {r['text']}", "target": LABELS[r["label"]], "task": "sentiment"}
                   for r in w.reviews()])
    fields = {"classify": (("text",), ("label",)), "seq2seq": (("input", "source", "text"), ("target", "output",
                                                                                              "answer"))}[task]
    out = []
    for where, rec in iter_records(source):
        got = [next((rec[k] for k in names if k in rec), None) for names in fields]
        if got[0] is None or got[1] is None or not isinstance(got[0], str):
            raise DataError(f"{where}: a {task} example needs {' or '.join(fields[0])} (text) and "
                            f"{' or '.join(fields[1])}; fields: {sorted(rec)[:10]}")
        keys = ("text", "label") if task == "classify" else ("input", "target")
        out.append({keys[0]: got[0], keys[1]: got[1] if task == "classify" else str(got[1]),
                    "task": rec.get("task", task)} | ({"group": rec["group"]} if "group" in rec else {}))
    if not out:
        raise DataError(f"{source}: no examples found")
    return out


def split(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded val_fraction of the records, or of their groups (record["group"], e.g. the person
    an extractive question is about, so that no held-out answer can be remembered from training)."""
    keys = sorted({r.get("group", i) for i, r in enumerate(records)}, key=str)
    order = np.random.default_rng([seed, 11]).permutation(len(keys))
    val = {keys[i] for i in order[:round(len(keys) * val_fraction)]}
    return ([r for i, r in enumerate(records) if r.get("group", i) not in val],
            [r for i, r in enumerate(records) if r.get("group", i) in val])


def label_names(records: list[dict]) -> list[str]:
    """Label names in id order: ints keep their value (names "0", "1", ...), strings are sorted."""
    labels = {r["label"] for r in records}
    if all(isinstance(x, int) for x in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(x) for x in labels)


def encode_text(tok, text: str, max_len: int, eos: bool = False) -> list[int]:
    """Token ids, cut to max_len keeping the last token when the tokenizer adds [SEP]/</s> itself. eos: the text
    ends with eos whatever the tokenizer adds (text-to-text), after bos when the tokenizer frames texts with one
    (BART: "<s> text </s>"; T5: "text </s>")."""
    ids = tok.encode(text, add_special_tokens=not eos)
    if eos:
        bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) else []
        ids = bos + ids[: max_len - 1 - len(bos)] + [tok.eos_token_id]
    return ids if len(ids) <= max_len else ids[: max_len - 1] + ids[-1:]


# ---------------------------------------------------------------------------------------------- model
def task_model(task: str, model_dir, rc: RunConfig, labels: list[str] | None):
    """The model to fine-tune: an encoder with a fresh classification head (or its own, when it already is a
    classifier with these labels), or a T5; LoRA adapters when lora.r > 0."""
    import lmlab
    from lmlab.models.encoder import Encoder, EncoderClassifier
    from lmlab.models.lora import apply_lora

    model = lmlab.load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    family = model.config.family
    if task == "classify":
        if family != "encoder":
            raise ConfigError(f"{model_dir}: --task classify needs an encoder (BERT/RoBERTa), not a {family} model")
        id2label = dict(enumerate(labels))
        if not (isinstance(model, EncoderClassifier) and model.id2label == id2label):
            backbone = model if isinstance(model, Encoder) else model.backbone
            torch.manual_seed(rc.train.seed)
            model = EncoderClassifier(model.config, len(labels), id2label=id2label, backbone=backbone)
    elif family != "encoder-decoder":
        raise ConfigError(f"{model_dir}: --task seq2seq needs an encoder-decoder model (T5, BART), not a {family} "
                          f"model")
    if rc.lora.r:
        torch.manual_seed(rc.train.seed)
        targets = rc.lora.targets if isinstance(rc.lora.targets, str) else tuple(rc.lora.targets)
        if model.config.model_type == "t5" and targets == tuple(LoRAConfig().targets):
            targets = T5_LORA_TARGETS  # T5's attention projections are named q, k, v, o
        apply_lora(model, rc.lora.r, rc.lora.alpha, rc.lora.dropout, targets)
        if task == "classify":  # the new head (and BERT's pooler) train with the adapters
            for module in (model.classifier, model.backbone.pooler):
                for p in (module.parameters() if module is not None else ()):
                    p.requires_grad = True
    model.train()
    return model


# ----------------------------------------------------------------------------------------- train/eval
def classify_batches(tok, seq_len: int, label_id: dict):
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def encode(r):
        return encode_text(tok, r["text"], seq_len), label_id[str(r["label"])]

    def collate(items):  # -> ids (B, T), attention mask (B, T), labels (B,)
        return *pad_with_mask([s for s, _ in items], pad), torch.tensor([y for _, y in items])
    return encode, collate


def classify_loss(model):
    def loss_fn(step_model, batch):
        ids, mask, y = (t.to(model.device) for t in batch)
        logits = step_model(ids, attention_mask=mask)  # (B, L)
        return F.cross_entropy(logits.float(), y), {"accuracy": float((logits.argmax(-1) == y).float().mean())}
    return loss_fn


@torch.no_grad()
def classify_predictions(model, tok, texts: list[str], seq_len: int = 256, batch_size: int = 64) -> list[int]:
    """Predicted label ids of raw texts."""
    encode, collate = classify_batches(tok, seq_len, {"0": 0})
    was_training, out = model.training, []
    model.eval()
    for i in range(0, len(texts), batch_size):
        ids, mask, _ = collate([encode({"text": t, "label": 0}) for t in texts[i: i + batch_size]])
        out += model(ids.to(model.device), attention_mask=mask.to(model.device)).argmax(-1).tolist()
    model.train(was_training)
    return out


@torch.no_grad()
def seq2seq_predictions(model, tok, inputs: list[str], seq_len: int = 256, max_new_tokens: int = 24,
                        batch_size: int = 32) -> list[str]:
    """Greedy answers of an encoder-decoder (T5, BART) to raw inputs."""
    from lmlab.inference.seq2seq import generate_seq2seq

    was_training, out = model.training, []
    model.eval()
    for i in range(0, len(inputs), batch_size):
        prompts = [encode_text(tok, x, seq_len, eos=True) for x in inputs[i: i + batch_size]]
        out += [tok.decode(ids, skip_special_tokens=True).strip()
                for ids in generate_seq2seq(model, prompts, max_new_tokens=max_new_tokens)]
    model.train(was_training)
    return out


def task_scores(task: str, model, tok, records: list[dict], label_id: dict | None, seq_len: int) -> dict:
    """Held-out accuracy (classify) or exact match (seq2seq), overall and per record["task"]."""
    if task == "classify":
        pred = classify_predictions(model, tok, [r["text"] for r in records], seq_len)
        right = [p == label_id[str(r["label"])] for p, r in zip(pred, records)]
        key = "accuracy"
    else:
        pred = seq2seq_predictions(model, tok, [r["input"] for r in records], seq_len)
        right = [p.strip().lower() == r["target"].strip().lower() for p, r in zip(pred, records)]
        key = "exact_match"
    out = {key: float(np.mean(right)) if right else 0.0, "val_examples": len(records)}
    for name in sorted({r["task"] for r in records}):
        picked = [ok for ok, r in zip(right, records) if r["task"] == name]
        out[f"{key}_{name}"] = float(np.mean(picked))
    return out


def run(rc: RunConfig, model_dir, out_dir, task: str, resume: bool = False, stop_at: int | None = None) -> dict:
    import lmlab
    from lmlab.models.lora import lora_layers, merge_lora

    if task not in DEFAULTS:
        raise ConfigError(f"--task must be lm, classify or seq2seq, got {task!r}")
    dist.init()
    out, t = Path(out_dir), rc.train
    micro = dist.micro_batch(t)
    tok = lmlab.load_tokenizer(model_dir)
    records = task_records(task, rc.data.source, rc.data.world_seed, rc.data.world_people)
    train_r, val_r = split(records, rc.data.val_fraction, t.seed)
    labels = label_names(records) if task == "classify" else None
    label_id = {name: i for i, name in enumerate(labels)} if labels else None
    model = task_model(task, model_dir, rc, labels)
    rc.model = model.config
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    if task == "classify":
        encode, collate = classify_batches(tok, t.seq_len, label_id)
        loss_fn = classify_loss(model)
    else:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        encode = lambda r: (encode_text(tok, r["input"], t.seq_len, eos=True),  # noqa: E731
                            encode_text(tok, r["target"], t.seq_len, eos=True))
        collate = lambda items: collate_span_corruption(items, pad)  # noqa: E731  (ids, mask, labels)
        loss_fn = seq2seq_loss(model)
    loader = ListLoader([encode(r) for r in train_r], micro, collate, t.seed, dist.rank(), dist.world_size())
    eval_fn = (lambda m: task_scores(task, m, tok, val_r, label_id, t.seq_len)) if val_r else None

    def save_model(d, state_dict):  # every weight, adapters included (a checkpoint to resume from)
        from safetensors.torch import save_file
        Path(d).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if not k.endswith("lm_head.weight") or not model.config.tie_word_embeddings},
                  str(Path(d) / "task_state.safetensors"))

    def load_model(m, d):
        from safetensors.torch import load_file
        m.load_state_dict(load_file(str(Path(d) / "task_state.safetensors")), strict=False)

    summary = train(model, loss_fn, loader, t, out, eval_fn=eval_fn, save_model=save_model, load_model=load_model,
                    tokenizer=tok, resume=resume, stop_at=stop_at, desc=f"finetune-{task}")
    if summary["stopped"] != "completed" or not dist.is_main():
        return summary
    final_model = merge_lora(copy.deepcopy(model)) if lora_layers(model) else model
    final = out / "final"
    final_model.save_pretrained(final)
    tok.save_pretrained(final)
    (final / "lmlab.json").write_text(json.dumps({"stage": f"finetune-{task}", "base_model": str(model_dir),
                                                  "config": rc.to_dict()}, indent=2))
    report = {"stage": "finetune", "task": task, "train_loss": summary["loss"], "steps": summary["step"],
              "seconds": summary["seconds"], "train_examples": len(train_r),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if val_r:
        report |= task_scores(task, final_model, tok, val_r, label_id, t.seq_len)
    write_report(out, report, f"Fine-tuning report ({task})")
    summary["report"] = report
    return summary
