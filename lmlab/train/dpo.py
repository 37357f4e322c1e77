"""Direct Preference Optimization (Rafailov et al. 2023), and IPO (Azar et al. 2023) as a loss option.

    lmlab dpo --model runs/sft/final --data world --out runs/dpo

No reward model and no sampling: with pi the policy and ref a frozen copy of where it started,
    h = beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]
    DPO loss = -log sigmoid(h)         (label_smoothing e: -(1-e) log sigmoid(h) - e log sigmoid(-h))
    IPO loss = (h / beta - 1 / (2 beta))^2, with per-token mean log-probs as in TRL
where log pi(y) sums the log-probs of the response tokens given the prompt. The reference log-probs are
computed with the policy's, batch by batch (a no-grad forward of the frozen copy): a run reads only the
pairs its steps draw (100 steps of 8 = 800 of the built-in world's ~24k), so nothing is precomputed.
beta * (log pi - log ref) is each response's implicit reward: its mean on chosen and rejected, their margin
and how often chosen wins are logged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.config import DPOConfig, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import (
    ListLoader,
    checkpoint_io,
    finish,
    frozen_copy,
    load_trainable,
    pack_sequences,
    pad_id,
    pad_right,
)

DEFAULTS = {"train": {"max_steps": 100, "batch_size": 8, "lr": 2e-5, "warmup_steps": 10, "weight_decay": 0.0,
                      "schedule": "linear", "eval_every": 0, "save_every": 0},
            "data": {"val_fraction": 0.1}}


def dpo_loss(pc, pr, rc, rr, cfg: DPOConfig, n_chosen=None, n_rejected=None):
    """Summed response log-probs (B,) of policy (p) and reference (r) on chosen (c) and rejected (r)
    -> (loss, metrics). For IPO pass the response token counts: it compares per-token means."""
    if cfg.loss == "ipo":
        pc, pr, rc, rr = pc / n_chosen, pr / n_rejected, rc / n_chosen, rr / n_rejected
    reward_c, reward_r = cfg.beta * (pc - rc), cfg.beta * (pr - rr)  # implicit rewards (B,)
    h = reward_c - reward_r
    if cfg.loss == "ipo":
        loss = ((h / cfg.beta - 1 / (2 * cfg.beta)) ** 2).mean()
    else:
        eps = cfg.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)).mean()
    reward_c, reward_r, h_ = reward_c.detach(), reward_r.detach(), h.detach()
    return loss, {"reward_chosen": float(reward_c.mean()), "reward_rejected": float(reward_r.mean()),
                  "reward_margin": float(h_.mean()), "reward_accuracy": float((h_ > 0).float().mean())}


def collate(pad_id: int, row_len: int = 256):
    """[item] -> (Packed: chosen_0, rejected_0, chosen_1, ..., each pair's prompt stored once
    (posttrain.pack_sequences), response-token mask (2B, L - 1) aligned with Packed.token_logprobs)."""
    def fn(items):
        pairs = [(it["chosen"], it["rejected"]) for it in items]
        packed = pack_sequences([[c[0], r[0]] for c, r in pairs], row_len, pad_id)
        return packed, pad_right([m for pair in pairs for _, m in pair], 0)[:, 1:].float()
    return fn


def sequence_logprobs(model, packed, mask) -> torch.Tensor:
    """(2B,) summed log-probs of the response tokens (mask[:, t] marks the target token t + 1)."""
    packed = packed.to(model.device)
    return (packed.token_logprobs(packed.run(model)) * mask.to(model.device)).sum(-1)


def make_loss(ref, cfg: DPOConfig):
    """The loop's loss function; `ref` is the frozen reference model."""
    def loss_fn(step_model, batch):
        packed, mask = batch
        lp = sequence_logprobs(step_model, packed, mask)
        with torch.no_grad():
            ref_lp = sequence_logprobs(ref, packed, mask).to(lp.device)
        n = mask.sum(-1).clamp(min=1).to(lp.device)
        (pc, pr), (rc, rr), (nc, nr) = lp.view(-1, 2).unbind(1), ref_lp.view(-1, 2).unbind(1), n.view(-1, 2).unbind(1)
        return dpo_loss(pc, pr, rc, rr, cfg, nc, nr)
    return loss_fn


EVAL_BATCH = 16  # pairs per evaluation batch


def spread(items: list, n: int) -> list:
    """At most n of items, evenly spaced (all when n <= 0): a validation subset that covers the whole split."""
    if n <= 0 or len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


@torch.no_grad()
def evaluate(model, ref, items, pad_id: int, cfg: DPOConfig, batch_size: int = EVAL_BATCH) -> dict:
    """Loss and implicit-reward accuracy/margin on held-out pairs, against the reference model `ref`."""
    fn, loss_fn, sums, n = collate(pad_id), make_loss(ref, cfg), {}, 0
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        loss, m = loss_fn(model, fn(chunk))
        for k, v in {"loss": float(loss), **m}.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}


def run(rc: RunConfig, model_dir, out_dir, ref_dir=None, resume: bool = False, stop_at: int | None = None) -> dict:
    import lmlab
    from lmlab.data.prefs import encode_pair
    from lmlab.train.posttrain import world_eval
    from lmlab.train.reward import preference_pairs

    dist.init()
    out, t = Path(out_dir), rc.train
    micro = dist.micro_batch(t)
    model, tok = load_trainable(model_dir, rc)
    ref = lmlab.load_model(ref_dir, device=model.device).eval() if ref_dir else frozen_copy(model)
    rc.model = model.config
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    pad = pad_id(tok)
    train_pairs, val_pairs = preference_pairs(rc)
    # train.eval_batches batches of held-out pairs, spread over the split (all 2480 of the world's took 43 s
    # here, longer than the 100 steps they evaluate; 320 measure the accuracy within ~3 points)
    val_items = [encode_pair(tok, p) for p in spread(val_pairs, t.eval_batches * EVAL_BATCH)]
    print(f"[dpo] {len(train_pairs)} training pairs, {len(val_items)} validation pairs; beta {rc.dpo.beta}, "
          f"{rc.dpo.loss} loss")
    batch = collate(pad, t.seq_len)  # pairs are encoded as batches draw them (all of the world's ~21k took 7 s)
    loader = ListLoader(train_pairs, micro, lambda ps: batch([encode_pair(tok, p) for p in ps]), t.seed,
                        dist.rank(), dist.world_size())
    save_model, load_model = checkpoint_io(model, lora=rc.lora.r > 0)
    summary = train(model, make_loss(ref, rc.dpo), loader, t, out,
                    eval_fn=(lambda m: evaluate(m, ref, val_items, pad, rc.dpo)) if val_items else None,
                    save_model=save_model, load_model=load_model, tokenizer=tok, resume=resume, stop_at=stop_at,
                    desc="dpo")
    if summary["stopped"] != "completed":
        return summary
    report = {"stage": "dpo", "train_loss": summary["loss"], "steps": summary["step"], "val_pairs": len(val_items),
              "seconds": summary["seconds"]}
    report |= {k: v for k, v in summary.items() if k.startswith("val_")}
    if rc.data.source == "world" and dist.is_main():
        model.eval()
        report |= world_eval(model, tok, rc, ref=ref)
    finish(model, tok, out, rc, "dpo", model_dir, report, "DPO report")
    summary["report"] = report
    return summary
