"""Instruction tuning: conversations rendered with the chat template, loss on assistant tokens only.

    lmlab sft --model runs/pretrain-tiny/final --data world --out runs/sft
    lmlab sft --model DIR --data chats.jsonl --lora-rank 16      # messages or alpaca jsonl

Full or LoRA (lora.r > 0: final/ holds the merged model, adapter/ the PEFT adapter). On the built-in
world the run ends with the world's exact scoring (QA accuracy on SFT and held-out people, "I don't
know" rate on unknown people, mean gold reward) in report.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import IGNORE, ListLoader, checkpoint_io, finish, load_trainable, pad_id, world_eval

# Gentle by default (DESIGN.md: an aggressive SFT memorises the SFT people and hurts held-out QA).
DEFAULTS = {"train": {"max_steps": 150, "batch_size": 8, "seq_len": 256, "lr": 1e-4, "warmup_steps": 10,
                      "weight_decay": 0.0, "eval_every": 0, "save_every": 0, "min_lr_ratio": 0.1},
            "data": {"val_fraction": 0.05}}


def masked_lm_loss(model):
    """Mean cross-entropy over the positions whose label is not IGNORE (SFT: assistant tokens; BERT: masked ones)."""
    def loss_fn(step_model, batch):
        x, y = (t.to(model.device) for t in batch)
        logits = step_model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE), {}
    return loss_fn


@torch.no_grad()
def masked_eval(model, rows, batch_size: int = 8) -> dict:
    """Loss over the assistant tokens of held-out conversations (summed over tokens, then averaged)."""
    from lmlab.data.sft import collate_rows

    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = (t.to(model.device) for t in collate_rows(rows[i: i + batch_size]))
        logits = model(x)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += int((y != IGNORE).sum())
    return {"val_loss": total / max(count, 1)}


def run(rc: RunConfig, model_dir, out_dir, resume: bool = False, stop_at: int | None = None) -> dict:
    from lmlab.data.sft import collate_rows, encode_conversations, load_conversations, make_rows

    dist.init()
    out, t = Path(out_dir), rc.train
    model, tok = load_trainable(model_dir, rc)
    rc.model = model.config
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    micro = dist.micro_batch(t)
    convs = load_conversations(rc.data.source, rc.data.world_seed, rc.data.world_people)
    order = np.random.default_rng(t.seed).permutation(len(convs))
    n_val = int(len(convs) * rc.data.val_fraction)
    examples = encode_conversations(tok, [convs[i] for i in order])
    pad = pad_id(tok)
    train_rows = make_rows(examples[n_val:], t.seq_len, pad, rc.data.packing, t.seed)
    val_rows = make_rows(examples[:n_val], t.seq_len, pad, packing=False)
    print(f"[sft] {len(convs) - n_val} conversations -> {len(train_rows)} rows of {t.seq_len} tokens"
          f"{' (packed)' if rc.data.packing else ''}; {n_val} held out for validation")
    loader = ListLoader(train_rows, micro, collate_rows, t.seed, dist.rank(), dist.world_size())
    save_model, load_model = checkpoint_io(model, lora=rc.lora.r > 0)
    summary = train(model, masked_lm_loss(model), loader, t, out,
                    eval_fn=(lambda m: masked_eval(m, val_rows)) if val_rows else None,
                    save_model=save_model, load_model=load_model, tokenizer=tok, resume=resume, stop_at=stop_at,
                    desc="sft")
    if summary["stopped"] != "completed":
        return summary
    report = {"stage": "sft", "train_loss": summary["loss"], "val_loss": summary.get("val_loss"),
              "steps": summary["step"], "seconds": summary["seconds"]}
    if rc.data.source == "world" and dist.is_main():
        model.eval()
        report |= world_eval(model, tok, rc)
    finish(model, tok, out, rc, "sft", model_dir, report, "Instruction tuning (SFT) report")
    summary["report"] = report
    return summary
