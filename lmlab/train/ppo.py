"""RLHF with PPO: the policy samples answers, a reward model scores them, PPO makes good answers likelier.

    lmlab ppo --model runs/sft/final --set ppo.reward_model=runs/reward/final --data world --out runs/ppo

The algorithm is PPO as Ziegler et al. (2019), InstructGPT and TRL's PPOTrainer run it for language models:
- a rollout: `ppo.rollout_batch` prompts, one sampled response each (the generation engine, temperature
  `ppo.temperature`); the score of (prompt, response) from the reward model (a ScalarHead), minus
  `ppo.missing_eos_penalty` if the response was cut off before its end-of-turn token;
- per-token rewards r_t = -kl_coef * (log pi(y_t) - log ref(y_t)), plus the score at the last token: the
  KL penalty to the frozen reference model sits in the reward; kl_coef is fixed or adaptive (Ziegler et al.:
  proportional control towards `ppo.target_kl`, the summed per-response KL);
- and, with `ppo.kl_loss_coef` > 0, the exact KL(pi || ref) over the whole vocabulary at each response position
  in the loss (verl's kl_loss): the sampled penalty above only sees the tokens a rollout drew, this one holds the
  probability of the tokens it did not draw too (docs/speedrun.md: a reply's first "I" for an unknown name);
- a separate value model (a ScalarHead: initialised from the reward model as TRL does, or from the policy),
  GAE(gamma, lam) advantages, whitened over the rollout; returns = advantages + values;
- `ppo.epochs` shuffled passes over the rollout in minibatches of `train.batch_size`, each an optimizer step
  of the one loop on  clipped surrogate (ratio clip `ppo.clip`) + vf_coef * clipped value loss.
Optionally PPO-ptx (InstructGPT): the pre-training LM loss on `ppo.ptx_batch` rows of `ppo.ptx_data` is added to
each micro-batch's loss with weight `ppo.ptx_coef`, which keeps the policy's knowledge while it follows the reward.
Simplified against TRL: no reward/score whitening or clipping, no entropy bonus, no early stop on KL
within a rollout, the value model does not share the policy's backbone (one optimizer trains both), and
log-probs use logits / temperature but ignore top_k. Metrics: reward (score), gold reward (the built-in
world's truth, never seen by the policy), KL to the reference, entropy, clip fractions, value loss.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ConfigError, PPOConfig, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import (
    checkpoint_io,
    finish,
    frozen_copy,
    load_trainable,
    pad_id,
    pad_right,
    write_report,
)

# Merged by the CLI under the user's config. One rollout of 32 prompts x 2 epochs / batch 8 = 8 optimizer
# steps, so 240 steps are 30 rollouts.
DEFAULTS = {"train": {"max_steps": 240, "batch_size": 8, "lr": 3e-5, "warmup_steps": 5, "schedule": "constant",
                      "weight_decay": 0.0, "eval_every": 0, "save_every": 0}}

ScoreFn = Callable[[list, list], Sequence[float]]  # (prompts, response texts) -> one score per response


# ----------------------------------------------------------------------------------------- pure functions
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries of all ranks; masked-out entries become 0."""
    n = dist.total(mask.sum())
    mean = dist.total((x * mask).sum()) / n
    var = dist.total((((x - mean) * mask) ** 2).sum()) / n
    return (x - mean) / math.sqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation. rewards, values, mask (B, R): response tokens, right-padded (mask is 1
    on a prefix of each row). -> (advantages, returns) (B, R), 0 where mask is 0. The value after the last
    token is 0 (the episode ends): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        nxt = mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)  # 0 past each row's end
        next_v = values[:, t + 1] * nxt if t + 1 < R else nxt
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * nxt * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


class AdaptiveKLController:
    """Ziegler et al. 2019 (TRL's AdaptiveKLController): coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) at each position, masked mean over positions.
    logits, ref_logits (B, R, V) (already / temperature); mask (B, R)."""
    logp, ref_logp = F.log_softmax(logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1)
    return masked_mean((logp.exp() * (logp - ref_logp)).sum(-1), mask)


def ppo_loss(logits, tokens, old_logp, advantages, values, old_values, returns, mask, clip: float = 0.2,
             clip_value: float = 0.2, vf_coef: float = 0.1):
    """The PPO objective on response tokens. logits (B, R, V) of the policy at the positions that predict
    tokens (B, R); old_logp, advantages, values, old_values, returns, mask (B, R). Means are masked means over
    response tokens. -> (loss, stats): pg_loss, vf_loss, clipfrac, approx_kl, entropy, vf_clipfrac (floats)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, R, V)
    logp = logprobs.gather(-1, tokens[..., None]).squeeze(-1)  # (B, R)
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, R)
        stats = {"pg_loss": pg_loss, "vf_loss": vf_loss, "clipfrac": masked_mean((pg2 > pg1).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask), "entropy": masked_mean(entropy, mask),
                 "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask)}
    return pg_loss + vf_coef * vf_loss, {k: float(v.detach()) for k, v in stats.items()}


# ------------------------------------------------------------------------------------------------ models
class PolicyAndValue(nn.Module):
    """The trained part: policy (optionally LoRA) and value model, so the loop's one optimizer steps both.
    forward(ids (B, T)) -> (logits (B, T, V), values (B, T))."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    device = property(lambda self: self.policy.device)
    config = property(lambda self: self.policy.config)

    def forward(self, input_ids, attention_mask=None, ptx_ids=None):
        """-> (logits, values), + the policy's logits on ptx_ids (B', T') when given: one forward, so DDP sees it."""
        out = self.policy(input_ids, attention_mask), self.value(input_ids, attention_mask)
        return out if ptx_ids is None else (*out, self.policy(ptx_ids))


def at_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> (B, R, ...): row b's entries at positions pos[b] (B, R)."""
    return x.gather(1, pos.view(*pos.shape, *[1] * (x.dim() - 2)).expand(*pos.shape, *x.shape[2:]))


def _response_logp(model, ids: torch.Tensor, pos: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(ids[b, pos + 1] | ids[b, :pos + 1]) under logits / temperature: ids (B, T), pos (B, R) -> (B, R).
    Rows are right-padded and attention is causal, so real tokens never see the padding: no mask needed."""
    logp = F.log_softmax(at_positions(model(ids), pos).float() / temperature, dim=-1)  # (B, R, V)
    return logp.gather(-1, at_positions(ids, pos + 1)[..., None]).squeeze(-1)


def collate(samples: list[dict], pad_id: int) -> dict:
    """Rollout samples -> tensors: ids (B, T) prompt + response right-padded; pos (B, R) the positions whose
    logits predict response token j (plen - 1 + j); mask (B, R); and the per-token rollout quantities."""
    ids = pad_right([s["ids"] for s in samples], pad_id)
    R = max(len(s["ids"]) - s["plen"] for s in samples)
    j = torch.arange(R)
    plen = torch.tensor([s["plen"] for s in samples])
    pos = (plen[:, None] - 1 + j).clamp(max=ids.shape[1] - 2)  # (B, R); padded entries point anywhere valid
    mask = (j < torch.tensor([len(s["ids"]) - s["plen"] for s in samples])[:, None]).float()
    out = {"ids": ids, "pos": pos, "mask": mask}
    for k in ("logp", "values", "adv", "ret"):
        if k in samples[0]:
            out[k] = _pad_float([s[k] for s in samples], R)
    return out


def _pad_float(rows: list[list[float]], length: int) -> torch.Tensor:
    return torch.stack([F.pad(torch.tensor(r, dtype=torch.float32), (0, length - len(r))) for r in rows])


# ------------------------------------------------------------------------------------------------ rollouts
class RolloutLoader:
    """The loop's data: each next() is one PPO micro-batch (a dict of tensors + the rollout's stats). When the
    buffer is used up it runs a new rollout with the current policy. state_dict() holds everything for an
    exact resume (prompt position, rollout counter, kl_coef, the remaining buffer); sampling is seeded from
    (train.seed, rollout, rank), so no RNG state needs saving."""

    def __init__(self, model: PolicyAndValue, ref, tok, prompts: list, rc: RunConfig, micro: int,
                 stop_ids: list[int], score: Callable, world=None, rank: int = 0, world_size: int = 1):
        from lmlab.chat import encode_chat
        from lmlab.data.prefs import chat_of

        self.model, self.ref, self.tok, self.prompts, self.cfg = model, ref, tok, prompts, rc.ppo
        self.encoded = [encode_chat(tok, chat_of(p), add_generation_prompt=True)[0] for p in prompts]
        self.micro, self.seed, self.stop_ids, self.score, self.world = micro, rc.train.seed, stop_ids, score, world
        self.rank, self.world_size = rank, world_size
        self.pad = pad_id(tok)
        self.autocast = rc.train.dtype == "bfloat16"  # old log-probs in the dtype the loss will see
        self.kl = AdaptiveKLController(rc.ppo.kl_coef, rc.ppo.target_kl, rc.ppo.kl_horizon)
        self.ptx = None  # PPO-ptx: (x, y) windows of pre-training text, ptx_batch per micro-batch
        if rc.ppo.ptx_coef > 0:
            from lmlab.data.shards import TokenLoader
            self.ptx = TokenLoader(rc.ppo.ptx_data, "train", rc.ppo.ptx_batch, rc.train.seq_len, rc.train.seed, rank,
                                   world_size)
        self.prompt_epoch = self.prompt_pos = self.rollouts = 0
        self.samples, self.queue, self.stats, self.history = [], [], {}, []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.queue:
            self.rollout()
        batch = collate([self.samples[i] for i in self.queue.pop(0)], self.pad)
        batch["stats"] = self.stats
        if self.ptx is not None:
            batch["ptx"] = next(self.ptx)  # (x, y) (ptx_batch, seq_len)
        return batch

    def _next_prompts(self) -> list[int]:
        picked = []
        while len(picked) < self.cfg.rollout_batch:  # epochs over the prompts, a seeded permutation each
            perm = np.random.default_rng([self.seed, 17, self.prompt_epoch]).permutation(len(self.prompts))
            take = perm[self.prompt_pos: self.prompt_pos + self.cfg.rollout_batch - len(picked)].tolist()
            picked += take
            self.prompt_pos += len(take)
            if self.prompt_pos >= len(perm):
                self.prompt_epoch, self.prompt_pos = self.prompt_epoch + 1, 0
        share = self.cfg.rollout_batch // self.world_size
        return picked[self.rank * share: (self.rank + 1) * share]

    def _sample(self, picked: list[int]) -> tuple[list[list[int]], list[str]]:
        """Responses of the current policy (eval mode; ids end at their stop token) and their texts. A text keeps
        its leading space: the reward model re-renders it with the chat template, and "\nAda" is other tokens
        than "\n Ada", which the reward stage trained on (the SFT replies start with a space)."""
        from lmlab.inference import SamplingParams, generate_ids

        cfg = self.cfg
        seed = (self.seed * 1_000_003 + self.rollouts) * 97 + self.rank  # exact resume needs no RNG state
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                stop_token_ids=self.stop_ids, seed=seed)
        responses = generate_ids(self.model.policy, [self.encoded[i] for i in picked], params)
        return responses, [self.text(r) for r in responses]

    def text(self, response_ids: list[int]) -> str:
        return self.tok.decode(response_ids, skip_special_tokens=True).rstrip()

    def _per_token(self, samples: list[dict]):
        """-> (policy log-probs, reference log-probs, values) (N, R) at every response token, in micro-batches,
        in the dtype the loss will see (bf16 autocast when train.dtype is bfloat16)."""
        dev, out = self.model.device, ([], [], [])
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        for i in range(0, len(samples), self.micro):
            b = collate(samples[i: i + self.micro], self.pad)
            ids, pos = b["ids"].to(dev), b["pos"].to(dev)
            with amp:
                out[0].append(_response_logp(self.model.policy, ids, pos, self.cfg.temperature).cpu())  # (b, R_b)
                out[1].append(_response_logp(self.ref, ids, pos, self.cfg.temperature).cpu())
                out[2].append(at_positions(self.model.value(ids).float(), pos).cpu())
        R = max(x.shape[1] for x in out[0])
        return [torch.cat([F.pad(x, (0, R - x.shape[1])) for x in xs]) for xs in out]

    @torch.no_grad()
    def rollout(self) -> None:
        """Sample, score, and fill the buffer with `epochs` shuffled passes over the new samples."""
        cfg, was_training = self.cfg, self.model.training
        self.model.eval()
        picked = self._next_prompts()
        prompts = [self.prompts[i] for i in picked]
        responses, texts = self._sample(picked)
        ended = torch.tensor([float(bool(r) and r[-1] in self.stop_ids) for r in responses])  # (N,)
        scores = torch.as_tensor(self.score(prompts, texts), dtype=torch.float32).cpu()
        scores = scores - cfg.missing_eos_penalty * (1 - ended)  # (N,)
        samples = [{"ids": self.encoded[i] + r, "plen": len(self.encoded[i])} for i, r in zip(picked, responses)]
        logp, ref_logp, values = self._per_token(samples)  # (N, R)
        mask = collate(samples, self.pad)["mask"]  # (N, R)
        values = values * mask
        lengths = mask.sum(1).long()  # (N,) >= 1: a response holds at least its first token
        kl_tok = (logp - ref_logp) * mask  # per-token KL estimate log pi - log ref
        rewards = -self.kl.value * kl_tok
        rewards[torch.arange(len(samples)), lengths - 1] += scores  # the score lands on the last token
        adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)
        for s, n, lp, v, a, r in zip(samples, lengths.tolist(), logp, values, adv, ret):
            s.update(logp=lp[:n].tolist(), values=v[:n].tolist(), adv=a[:n].tolist(), ret=r[:n].tolist())
        stats = {"rollout": self.rollouts, "score": scores.mean(), "kl": kl_tok.sum(1).mean(),
                 "response_len": lengths.float().mean(), "ended": ended.mean(), "kl_coef": self.kl.value}
        if self.world is not None:  # the truth, which the policy never sees
            stats["gold_reward"] = torch.tensor([self.world.gold_reward(p, t) for p, t in zip(prompts, texts)]).mean()
        self.stats = {k: dist.mean(torch.as_tensor(v, dtype=torch.float64)) for k, v in stats.items()}
        self.history.append(self.stats)
        if cfg.adaptive_kl:
            self.kl.update(self.stats["kl"], cfg.rollout_batch)
        self.samples, self.queue = samples, []  # the queue: micro-batches as index lists into self.samples
        for epoch in range(cfg.epochs):
            perm = np.random.default_rng([self.seed, 29, self.rollouts, epoch, self.rank]).permutation(len(samples))
            self.queue += [perm[i: i + self.micro].tolist() for i in range(0, len(perm), self.micro)]
        self.rollouts += 1
        self.model.train(was_training)

    def state_dict(self) -> dict:
        return {"prompt_epoch": self.prompt_epoch, "prompt_pos": self.prompt_pos, "rollouts": self.rollouts,
                "kl_coef": self.kl.value, "samples": self.samples, "queue": self.queue, "stats": self.stats,
                "history": self.history, "ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_epoch, self.prompt_pos, self.rollouts = state["prompt_epoch"], state["prompt_pos"], state["rollouts"]
        self.kl.value, self.samples, self.queue = state["kl_coef"], state["samples"], state["queue"]
        self.stats, self.history = state["stats"], state["history"]
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.load_state_dict(state["ptx"])


def make_loss(cfg: PPOConfig, ref):
    def loss_fn(step_model, batch):
        dev = next(step_model.parameters()).device
        ids, pos, mask = batch["ids"].to(dev), batch["pos"].to(dev), batch["mask"].to(dev)
        ptx = batch.get("ptx")
        out = step_model(ids, ptx_ids=ptx[0].to(dev) if ptx is not None else None)  # (B, T, V), (B, T)[, ptx logits]
        logits = at_positions(out[0], pos).float() / cfg.temperature  # (B, R, V)
        loss, stats = ppo_loss(logits, at_positions(ids, pos + 1), batch["logp"].to(dev), batch["adv"].to(dev),
                               at_positions(out[1].float(), pos), batch["values"].to(dev), batch["ret"].to(dev),
                               mask, cfg.clip, cfg.clip_value, cfg.vf_coef)
        if cfg.kl_loss_coef > 0:  # the reference's logits at the same positions (no gradient: ref is frozen)
            with torch.no_grad():
                ref_logits = at_positions(ref(ids), pos).float() / cfg.temperature
            kl = exact_kl(logits, ref_logits, mask)
            loss, stats["kl_loss"] = loss + cfg.kl_loss_coef * kl, float(kl.detach())
        if ptx is not None:  # PPO-ptx: the pre-training LM loss on its own rows
            lm = F.cross_entropy(out[2].float().flatten(0, 1), ptx[1].to(dev).flatten())
            loss, stats["ptx_loss"] = loss + cfg.ptx_coef * lm, float(lm.detach())
        return loss, {**stats, **batch["stats"]}
    return loss_fn


# ----------------------------------------------------------------------------------------------------- run
# The world's preference prompts name someone not in the world a quarter of the time; PPO takes those WORLD_UNKNOWN
# times, so that they are about half of its prompts. With a quarter, the updates on the seen people's prompts (whose
# rewarded replies start with the name) teach the policy to answer every name (docs/speedrun.md).
WORLD_UNKNOWN = 3


def load_prompts(rc: RunConfig) -> list:
    """The prompts of data.source: the world's preference prompts (SFT people and unknown names, never the
    evaluation's; those about unknown names WORLD_UNKNOWN times each), or the "prompt" field (a string or a
    messages list ending with a user turn) of .jsonl records."""
    if rc.data.source == "world":
        from lmlab.data.world import make_world
        world = make_world(seed=rc.data.world_seed, n_people=rc.data.world_people)
        prompts = [r["prompt"] for r in world.preferences()]
        return [p for p in prompts for _ in range(WORLD_UNKNOWN if world.parse_prompt(p)[2] is None else 1)]
    from lmlab.data.text import DataError, iter_records
    out = []
    for where, rec in iter_records(rc.data.source):
        p = rec.get("prompt")
        if not (isinstance(p, str) and p or isinstance(p, list) and p and isinstance(p[-1], dict)
                and p[-1].get("role") == "user"):
            raise DataError(f"{where}: needs a 'prompt': a string or a messages list ending with a user message")
        out.append(p)
    if not out:
        raise DataError(f"{rc.data.source}: no prompts found")
    return out


def reward_model_scorer(rm, tok, batch_size: int = 16) -> ScoreFn:
    """Score (prompt, response) as the reward stage trained it: the chat rendering of [user, assistant], the
    head's value at the last token."""
    from lmlab.chat import encode_chat
    from lmlab.data.prefs import chat_of

    def score(prompts, texts):
        seqs = [encode_chat(tok, chat_of(p, t))[0] for p, t in zip(prompts, texts)]
        out = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i: i + batch_size]
            ids, mask = pad_right(chunk, 0), pad_right([[1] * len(s) for s in chunk], 0)
            out.append(rm.reward(ids.to(rm.device), mask.to(rm.device)).float().cpu())
        return torch.cat(out)
    return score


def _load_reward_model(path, device):
    import lmlab
    from lmlab.models.heads import ScalarHead

    if not path:
        raise ConfigError("PPO needs a reward model: --set ppo.reward_model=DIR (a directory `lmlab reward` wrote)")
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"ppo.reward_model: {path} is not a model directory (no config.json)")
    rm = lmlab.load_model(path, device=device)
    if not isinstance(rm, ScalarHead):
        raise ConfigError(f"ppo.reward_model: {path} is a {type(rm).__name__}, not a reward model "
                          "(a *ForSequenceClassification directory with one label, as `lmlab reward` writes)")
    return rm


def run(rc: RunConfig, model_dir, out_dir, ref_dir=None, resume: bool = False, stop_at: int | None = None,
        show_progress: bool = True, score_fn: ScoreFn | None = None) -> dict:
    """PPO from the chat model in model_dir; -> the loop's summary (+ "report" when it completed).

    The score comes from the reward model in ppo.reward_model, or from a reward function: score_fn(prompts,
    response_texts) -> one float per response (as TRL's reward_funcs), or ppo.reward_model=world-gold, the
    built-in world's gold reward (an oracle, to compare with a learned reward model). Without a reward model
    the value model starts from the policy. ref_dir: the reference model (default: the policy as it starts)."""
    import lmlab
    from lmlab.chat import stop_token_ids
    from lmlab.models.heads import ScalarHead

    dist.init()
    out, t, p = Path(out_dir), rc.train, rc.ppo
    W, micro = dist.world_size(), dist.micro_batch(t)
    checks = [(p.rollout_batch % t.batch_size == 0,
               f"ppo.rollout_batch ({p.rollout_batch}) must be a multiple of train.batch_size ({t.batch_size})"),
              (p.temperature > 0, "ppo.temperature must be > 0 (PPO needs sampled responses)"),
              (p.max_new_tokens >= 1, "ppo.max_new_tokens must be >= 1"),
              (not (W > 1 and t.distributed == "fsdp"), "PPO runs under DDP only (train.distributed=ddp)")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    torch.manual_seed(t.seed)  # LoRA's A matrices and the value head of value_init=policy start from it
    policy, tok = load_trainable(model_dir, rc)
    dev = policy.device
    if ref_dir:
        ref = lmlab.load_model(ref_dir, device=dev).eval().requires_grad_(False)
    else:
        ref = frozen_copy(policy)  # the policy as it starts (with LoRA: adapters at zero, i.e. the base)
    world = None
    if rc.data.source == "world":
        from lmlab.data.world import make_world
        world = make_world(seed=rc.data.world_seed, n_people=rc.data.world_people)
    rm = None
    if score_fn is None and p.reward_model == "world-gold":  # an oracle: the world's own truth as the reward
        if world is None:
            raise ConfigError("ppo.reward_model=world-gold needs data.source=world")
        def score_fn(prompts, texts):
            return [world.gold_reward(q, r) for q, r in zip(prompts, texts)]
    if score_fn is None:
        rm = _load_reward_model(p.reward_model, dev).requires_grad_(False)
        has_tok = any((Path(p.reward_model) / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        score_fn = reward_model_scorer(rm, lmlab.load_tokenizer(p.reward_model) if has_tok else tok, micro)
    value_from = "reward model" if p.value_init == "reward" and rm is not None else "policy"
    if value_from == "reward model":
        if rm.config.vocab_size != policy.config.vocab_size:
            raise ConfigError("ppo.value_init=reward: the reward model's vocabulary differs from the policy's; "
                              "set ppo.value_init=policy")
        value = copy.deepcopy(rm)  # starts as the reward model, then trains (the reward model stays frozen)
    else:  # value_init=policy, or no reward model to start from (a reward function)
        value = ScalarHead(lmlab.load_model(model_dir, device=dev))
    value.requires_grad_(True).train()
    model = PolicyAndValue(policy, value)
    rc.model = policy.config
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    prompts = load_prompts(rc)
    stop_ids = sorted(set(stop_token_ids(tok)) | set(policy.config.eos_ids))
    loader = RolloutLoader(model, ref, tok, prompts, rc, micro, stop_ids, score_fn, world, dist.rank(), W)
    steps_per_rollout = p.epochs * p.rollout_batch // t.batch_size
    if show_progress and dist.is_main():
        print(f"[ppo] {len(prompts)} prompts; rollouts of {p.rollout_batch} x {p.epochs} epochs = {steps_per_rollout} "
              f"steps each; {math.ceil(t.max_steps / steps_per_rollout)} rollouts; kl_coef {p.kl_coef}"
              f"{' (adaptive)' if p.adaptive_kl else ''}; value model from the {value_from}")
    save_policy, load_policy = checkpoint_io(policy, lora=rc.lora.r > 0)

    def save_model(d, state_dict):  # a checkpoint: the policy (full or adapter) + value/ (a ScalarHead dir)
        save_policy(d, None)
        value.save_pretrained(Path(d) / "value")

    def load_model(m, d):
        load_policy(m.policy, d)
        m.value.load_state_dict(lmlab.load_model(Path(d) / "value", device=dev).state_dict())

    summary = train(model, make_loss(p, ref), loader, t, out, save_model=save_model, load_model=load_model, tokenizer=tok,
                    resume=resume, stop_at=stop_at, desc="ppo")
    if summary["stopped"] != "completed":
        return summary
    first, last = loader.history[0], loader.history[-1]
    report = {"stage": "ppo", "steps": summary["step"], "rollouts": loader.rollouts, "seconds": summary["seconds"]}
    for k in ("score", "gold_reward", "kl", "response_len"):
        if k in last:
            report |= {f"rollout_{k}_first": first[k], f"rollout_{k}_last": last[k]}
    report["kl_coef"] = loader.kl.value
    if world is not None and dist.is_main():
        from lmlab.train.posttrain import world_eval
        policy.eval()
        report |= world_eval(policy, tok, rc, ref=ref)
    finish(policy, tok, out, rc, "ppo", model_dir, report, "RLHF (PPO) report")
    if dist.is_main():
        _plot(out, loader.history)
        write_report(out, report, "RLHF (PPO) report", ("plots/loss.png", "plots/ppo.png"))
        (out / "rollouts.json").write_text(json.dumps(loader.history, indent=1))
    summary["report"] = report
    return summary


def _plot(out: Path, history: list[dict]) -> None:
    """plots/ppo.png: score, gold reward and KL per rollout."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    (out / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [h["rollout"] for h in history]
    for ax, keys in zip(axes, (("score", "gold_reward"), ("kl",))):
        for k in (k for k in keys if k in history[0]):
            ax.plot(x, [h[k] for h in history], label=k if k != "kl" else "KL to the reference (per response)")
        ax.set(xlabel="rollout")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots" / "ppo.png", dpi=100)
    plt.close(fig)
