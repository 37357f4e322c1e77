"""Reward model: the policy's backbone with a scalar head, trained on human-style preferences.

    lmlab reward --model runs/sft/final --data world --out runs/reward
    lmlab eval --model runs/reward/final --task reward

Bradley-Terry: P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)), so the loss per pair is
    -log sigmoid(r_c - r_r - margin)
where r is the head's value at the last token of prompt + response (rendered with the chat template).
A K-way ranking contributes all its pairs (data/prefs.py). final/ is a `*ForSequenceClassification`
directory with one label, which transformers loads and scores the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import ListLoader, checkpoint_io, finish, pad_id, pad_right

DEFAULTS = {"train": {"max_steps": 150, "batch_size": 16, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0,
                      "eval_every": 50, "save_every": 0},
            "data": {"val_fraction": 0.1}}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0):
    """(B,) rewards -> mean -log sigmoid(r_c - r_r - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def collate_pairs(pad_id: int):
    """[encoded pair] -> (ids (2B, L): chosen rows then rejected rows, attention mask (2B, L), margins (B,))."""
    def collate(items):
        seqs = [it["chosen"][0] for it in items] + [it["rejected"][0] for it in items]
        ids = pad_right(seqs, pad_id)
        mask = pad_right([[1] * len(s) for s in seqs], 0)
        return ids, mask, torch.tensor([float(it["margin"]) for it in items])
    return collate


def pair_rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, _ = batch
    r = model.reward(ids.to(model.device), mask.to(model.device))  # (2B,)
    return r.chunk(2)


def reward_loss(model):
    def loss_fn(step_model, batch):
        r_c, r_r = pair_rewards(step_model, batch)
        loss = bradley_terry_loss(r_c, r_r, batch[2].to(r_c.device))
        return loss, {"accuracy": float((r_c > r_r).float().mean()), "reward_margin": float((r_c - r_r).detach().mean())}
    return loss_fn


@torch.no_grad()
def pair_accuracy(model, encoded_pairs, pad_id: int, batch_size: int = 16) -> dict:
    """Fraction of pairs whose chosen response gets the higher reward, and the mean loss."""
    collate, right, loss, n = collate_pairs(pad_id), 0, 0.0, len(encoded_pairs)
    for i in range(0, n, batch_size):
        batch = collate(encoded_pairs[i: i + batch_size])
        r_c, r_r = pair_rewards(model, batch)
        right += int((r_c > r_r).sum())
        loss += float(bradley_terry_loss(r_c, r_r, batch[2]) * len(r_c))
    return {"pair_acc": right / max(n, 1), "val_loss": loss / max(n, 1), "pairs": n}


def preference_data(rc: RunConfig, tok):
    """(train pairs, val pairs), encoded; the split is by prompt (data.val_fraction, train.seed)."""
    from lmlab.data.prefs import encode_pair, load_rankings, split_rankings, to_pairs

    rankings = load_rankings(rc.data.source, rc.data.world_seed, rc.data.world_people)
    train_r, val_r = split_rankings(rankings, rc.data.val_fraction, rc.train.seed)
    enc = lambda rs: [encode_pair(tok, p) for p in to_pairs(rs, rc.reward.margin)]  # noqa: E731
    return enc(train_r), enc(val_r)


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
    train_pairs, val_pairs = preference_data(rc, tok)
    print(f"[reward] {len(train_pairs)} training pairs, {len(val_pairs)} validation pairs (held-out prompts)")
    loader = ListLoader(train_pairs, micro, collate_pairs(pad), t.seed, dist.rank(), dist.world_size())
    save_model, load_model = checkpoint_io(model, lora=False)
    summary = train(model, reward_loss(model), loader, t, out,
                    eval_fn=(lambda m: pair_accuracy(m, val_pairs, pad)) if val_pairs else None,
                    save_model=save_model, load_model=lambda m, d: _load_scalar(m, d), tokenizer=tok,
                    resume=resume, stop_at=stop_at, desc="reward")
    if summary["stopped"] != "completed":
        return summary
    report = {"stage": "reward", "pair_acc": summary.get("pair_acc"), "val_loss": summary.get("val_loss"),
              "train_loss": summary["loss"], "val_pairs": len(val_pairs), "steps": summary["step"],
              "seconds": summary["seconds"]}
    finish(model, tok, out, rc, "reward", model_dir, report, "Reward model report")
    summary["report"] = report
    return summary


def _load_scalar(model, ckpt_dir):
    """Resume: copy a checkpoint's reward-model weights into `model`."""
    import lmlab

    saved = lmlab.load_model(ckpt_dir, device=model.device)
    model.load_state_dict(saved.state_dict())


def evaluate(model_dir, data: str = "world", batch_size: int = 16) -> dict:
    """`lmlab eval --task reward`: pairwise accuracy on the validation pairs of the run that trained the model
    (same data, split and seed, from its lmlab.json), or on every pair of `data` when it is a file."""
    import json

    import lmlab

    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    meta = Path(model_dir) / "lmlab.json"
    rc = RunConfig.from_dict(json.loads(meta.read_text())["config"]) if meta.exists() else RunConfig()
    if data != rc.data.source or not meta.exists():  # someone else's data: every pair is held out
        rc.data.source, rc.data.val_fraction = data, 1.0
    _, val_pairs = preference_data(rc, tok)
    pad = pad_id(tok)
    return pair_accuracy(model, val_pairs, pad, batch_size)
