"""Reward model: the policy's backbone with a scalar head, trained on human-style preferences.

    lmlab reward --model runs/sft/final --data world --out runs/reward
    lmlab eval --model runs/reward/final --task reward

Bradley-Terry: P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)), so the loss per pair is
    -log sigmoid(r_c - r_r - margin)
where r is the head's value at the last token of prompt + response (rendered with the chat template).
A K-way ranking contributes all its pairs (data/prefs.py), and is one batch element: its K responses are
scored once and every pair's loss read from those K rewards, as InstructGPT trains (train.batch_size counts
rankings; a plain pair is a ranking of two). Per pair that is (K-1)/2 times fewer forward rows than
feeding pairs, and each response is seen once per epoch instead of K-1 times. A batch is packed
(posttrain.pack_sequences): a ranking's prompt is stored once, and rankings fill rows of train.seq_len tokens
under a block mask, each response computed as alone. final/ is a `*ForSequenceClassification`
directory with one label, which transformers loads and scores the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import ListLoader, checkpoint_io, finish, pack_sequences, pad_id

# Calibrated on the built-in world (docs/posttraining.md): checking a stated fact is learned slowly, so lr 3e-4
# and 1200 steps (~4.5 min in bf16 on 2 CPU cores): held-out pair accuracy 0.80 at 600 steps, 0.92-0.93 at 1200.
DEFAULTS = {"train": {"max_steps": 1200, "batch_size": 8, "lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.0,
                      "eval_every": 400, "save_every": 0},
            "data": {"val_fraction": 0.1}}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0):
    """(B,) rewards -> mean -log sigmoid(r_c - r_r - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def collate_rankings(pad_id: int, row_len: int = 256):
    """[encoded ranking] -> (Packed: every response of every ranking once, a ranking's prompt stored once
    (posttrain.pack_sequences), better (P,), worse (P,): indices of each pair's responses, margins (P,))."""
    def collate(items):
        groups, better, worse, margins, first = [], [], [], [], 0
        for it in items:
            groups.append([ids for ids, _ in it["responses"]])
            for i, j, m in it["pairs"]:
                better.append(first + i)
                worse.append(first + j)
                margins.append(float(m))
            first += len(groups[-1])
        return pack_sequences(groups, row_len, pad_id), torch.tensor(better), torch.tensor(worse), torch.tensor(margins)
    return collate


def pair_rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards of the better responses (P,), rewards of the worse ones (P,))."""
    packed, better, worse, _ = batch
    packed = packed.to(model.device)
    r = packed.last(packed.run(model))  # (N,)
    return r[better.to(r.device)], r[worse.to(r.device)]


def reward_loss(model):
    def loss_fn(step_model, batch):
        r_c, r_r = pair_rewards(step_model, batch)
        loss = bradley_terry_loss(r_c, r_r, batch[3].to(r_c.device))
        return loss, {"accuracy": float((r_c > r_r).float().mean()), "reward_margin": float((r_c - r_r).detach().mean())}
    return loss_fn


@torch.no_grad()
def pair_accuracy(model, encoded_rankings, pad_id: int, batch_size: int = 8) -> dict:
    """Fraction of pairs whose better response gets the higher reward, and the mean loss, over the pairs of
    `encoded_rankings` (prefs.encode_ranking; a pair is a ranking of two)."""
    collate, right, loss, n = collate_rankings(pad_id), 0, 0.0, 0
    for i in range(0, len(encoded_rankings), batch_size):
        batch = collate(encoded_rankings[i: i + batch_size])
        r_c, r_r = pair_rewards(model, batch)
        right += int((r_c > r_r).sum())
        loss += float(bradley_terry_loss(r_c, r_r, batch[3]) * len(r_c))
        n += len(r_c)
    return {"pair_acc": right / max(n, 1), "val_loss": loss / max(n, 1), "pairs": n}


def preference_pairs(rc: RunConfig):
    """(train pairs, val pairs) for DPO, as text (prefs.to_pairs); the split is by prompt (data.val_fraction,
    train.seed), the reward model's."""
    from lmlab.data.prefs import to_pairs

    train_r, val_r = _split(rc)
    return to_pairs(train_r, rc.reward.margin), to_pairs(val_r, rc.reward.margin)


def ranking_data(rc: RunConfig, tok):
    """(train rankings, val rankings), each response encoded once (prefs.encode_ranking); split as above."""
    from lmlab.data.prefs import encode_ranking

    train_r, val_r = _split(rc)
    return [encode_ranking(tok, r, rc.reward.margin) for r in train_r], \
        [encode_ranking(tok, r, rc.reward.margin) for r in val_r]


def _split(rc: RunConfig):
    from lmlab.data.prefs import load_rankings, split_rankings

    rankings = load_rankings(rc.data.source, rc.data.world_seed, rc.data.world_people)
    return split_rankings(rankings, rc.data.val_fraction, rc.train.seed)


def run(rc: RunConfig, model_dir, out_dir, resume: bool = False, stop_at: int | None = None) -> dict:
    import lmlab
    from lmlab.models.heads import ScalarHead

    dist.init()
    if rc.lora.r:
        raise ConfigError("lmlab reward trains every weight of the reward model; set lora.r=0")
    out, t = Path(out_dir), rc.train
    micro = dist.micro_batch(t)
    base = lmlab.load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(base, ScalarHead):
        model = base  # continue training a reward model
    else:
        torch.manual_seed(t.seed)
        model = ScalarHead(base)
    model.train()
    tok = lmlab.load_tokenizer(model_dir)
    pad = pad_id(tok)
    model.config.pad_token_id = pad  # transformers finds the scored (last real) token through pad_token_id
    rc.model = model.config
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    train_r, val_r = ranking_data(rc, tok)
    n_val = sum(len(r["pairs"]) for r in val_r)
    print(f"[reward] {len(train_r)} training rankings ({sum(len(r['pairs']) for r in train_r)} pairs), "
          f"{len(val_r)} validation rankings ({n_val} pairs, held-out prompts)")
    loader = ListLoader(train_r, micro, collate_rankings(pad, t.seq_len), t.seed, dist.rank(), dist.world_size())
    save_model, load_model = checkpoint_io(model, lora=False)
    summary = train(model, reward_loss(model), loader, t, out,
                    eval_fn=(lambda m: pair_accuracy(m, val_r, pad)) if val_r else None,
                    save_model=save_model, load_model=lambda m, d: _load_scalar(m, d), tokenizer=tok,
                    resume=resume, stop_at=stop_at, desc="reward")
    if summary["stopped"] != "completed":
        return summary
    report = {"stage": "reward", "pair_acc": summary.get("pair_acc"), "val_loss": summary.get("val_loss"),
              "train_loss": summary["loss"], "val_pairs": n_val, "steps": summary["step"],
              "seconds": summary["seconds"]}
    finish(model, tok, out, rc, "reward", model_dir, report, "Reward model report")
    summary["report"] = report
    return summary


def _load_scalar(model, ckpt_dir):
    """Resume: copy a checkpoint's reward-model weights into `model`."""
    import lmlab

    saved = lmlab.load_model(ckpt_dir, device=model.device)
    model.load_state_dict(saved.state_dict())


def evaluate(model_dir, data: str = "world", batch_size: int = 8) -> dict:
    """`lmlab eval --task reward`: pairwise accuracy on the validation pairs of the run that trained the model
    (same data, split and seed, from its lmlab.json), or on every pair of `data` when it is a file."""
    import json

    import lmlab

    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    meta = Path(model_dir) / "lmlab.json"
    rc = RunConfig.from_dict(json.loads(meta.read_text())["config"]) if meta.exists() else RunConfig()
    if data != rc.data.source or not meta.exists():  # someone else's data: every pair is held out
        rc.data.source, rc.data.val_fraction = data, 1.0
    _, val_r = ranking_data(rc, tok)
    return pair_accuracy(model, val_r, pad_id(tok), batch_size)
