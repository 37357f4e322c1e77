"""What the post-training stages (finetune, sft, reward, dpo, ppo) share.

- `load_trainable`: a model directory -> a model in training mode, with LoRA adapters if lora.r > 0;
- `token_logprobs`: log p(token_t | tokens_<t) for every position, the quantity DPO and PPO work on;
- `ListLoader`: an in-memory data set as an endless, shuffled, resumable batch iterator for the one loop;
- `checkpoint_io` / `finish`: what a checkpoint and the run's final/ (+ adapter/) hold, and report files.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunConfig
from lmlab.train import dist

IGNORE = -100  # label of positions that carry no loss (prompt, padding), as in transformers


def load_trainable(model_dir, rc: RunConfig, device=None):
    """-> (model, tokenizer): fp32 weights, train mode, LoRA applied when rc.lora.r > 0."""
    import lmlab
    from lmlab.models.lora import apply_lora

    model = lmlab.load_model(model_dir, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = lmlab.load_tokenizer(model_dir)
    if rc.lora.r:
        torch.manual_seed(rc.train.seed)  # the adapters' random A matrices: reproducible runs
        targets = rc.lora.targets if isinstance(rc.lora.targets, str) else tuple(rc.lora.targets)
        apply_lora(model, rc.lora.r, rc.lora.alpha, rc.lora.dropout, targets)
        from lmlab.models.lora import _peft_prefix, lora_layers
        for name in lora_layers(model):  # fail now, not at the first checkpoint, if PEFT cannot hold the adapter
            _peft_prefix(model, name)
    model.train()
    return model, tok


def pad_id(tok) -> int:
    """The id that pads batches (its positions carry no loss and are masked): pad, else eos, else 0."""
    for i in (tok.pad_token_id, tok.eos_token_id):
        if i is not None:
            return i
    return 0


def frozen_copy(model):
    """An eval-mode copy whose parameters take no gradient (the reference model of DPO and PPO)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad = False
    return ref


def token_logprobs(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, T) -> (B, T - 1) float32: entry t is log p(ids[:, t + 1] | ids[:, : t + 1])."""
    logits = model(ids, attention_mask) if attention_mask is not None else model(ids)  # (B, T, V)
    B, T = ids.shape
    return -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                            reduction="none").view(B, T - 1)


@dataclass
class Packed:
    """Sequences packed into few rows (pack_sequences). Tokens sit in rows (B, T); `index` (N, L) holds the flat
    place (b * T + t) of each sequence's tokens in order, right-padded with its last token's place (so
    index[:, -1] is every sequence's last token)."""
    ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T): each token's position in its own sequence
    mask: torch.Tensor  # (B, 1, T, T) bool, True = may attend: its own sequence's earlier tokens
    index: torch.Tensor  # (N, L)
    lengths: torch.Tensor  # (N,)

    def to(self, device) -> "Packed":
        return Packed(*(getattr(self, f.name).to(device) for f in fields(self)))

    def run(self, model) -> torch.Tensor:
        """model(ids, 4-D mask, position_ids): logits (B, T, V) of a decoder, values (B, T) of a ScalarHead."""
        return model(self.ids, self.mask, self.position_ids)

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, ...) -> (N, ...): each sequence's value at its last token."""
        return x.flatten(0, 1)[self.index[:, -1]]

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, T, V) -> (N, L - 1) float32, as `token_logprobs` of each sequence alone (0 past its end):
        at a shared prefix's last token the row predicts each branch's own next token."""
        flat = logits.flatten(0, 1)  # (B*T, V)
        rows, targets = self.index[:, :-1], self.ids.flatten()[self.index[:, 1:]]  # (N, L - 1): row t predicts t + 1
        lse = flat.float().logsumexp(-1)  # (B*T,)
        logp = flat[rows, targets].float() - lse[rows]
        return logp * (torch.arange(1, self.index.shape[1], device=logp.device) < self.lengths[:, None])


def pack_sequences(groups: Sequence[Sequence[Sequence[int]]], row_len: int, pad_id: int) -> Packed:
    """Sequences -> Packed rows. A group is sequences that share a prefix (a ranking's responses to one prompt, a
    DPO pair): the prefix is stored once and each sequence's rest follows it, seeing the prefix and itself
    (tree packing), so a forward computes every sequence exactly as alone, up to rounding. Groups fill rows of
    `row_len` tokens (or the longest group) first-fit, longest first. On the world's rankings this stores 0.72 of
    the tokens with no padding rows, and a reward-model step runs 1.7x faster than rows of one sequence each.
    Sequences come out in order: group by group, and within a group as given."""
    trees = []  # (prefix, [rest of each sequence])
    for g in groups:
        p = 0
        while p < min(map(len, g)) and all(s[p] == g[0][p] for s in g):
            p += 1
        trees.append((list(g[0][:p]), [list(s[p:]) for s in g]))
    sizes = [len(pre) + sum(map(len, rest)) for pre, rest in trees]
    row_len = max(row_len, *sizes)
    rows, free = [], []  # rows: [tree indices]; free: tokens left in each row
    for i in sorted(range(len(trees)), key=lambda i: -sizes[i]):
        r = next((r for r in range(len(rows)) if free[r] >= sizes[i]), None)
        if r is None:  # a new row
            r = len(rows)
            rows.append([])
            free.append(row_len)
        rows[r].append(i)
        free[r] -= sizes[i]
    T = row_len - min(free)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    tree = torch.full((len(rows), T), -1)  # which tree of the row a token belongs to (-1: padding)
    branch = torch.full((len(rows), T), -1)  # which sequence of its tree (-1: the shared prefix)
    first = np.cumsum([0] + [len(g) for g in groups])
    places: list = [None] * int(first[-1])
    for b, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            pre, rest = trees[i]
            ids[b, t: t + len(pre)] = torch.tensor(pre, dtype=torch.long)
            pos[b, t: t + len(pre)] = torch.arange(len(pre))
            tree[b, t: t + len(pre)] = k
            head = list(range(b * T + t, b * T + t + len(pre)))
            t += len(pre)
            for j, x in enumerate(rest):
                ids[b, t: t + len(x)] = torch.tensor(x, dtype=torch.long)
                pos[b, t: t + len(x)] = torch.arange(len(pre), len(pre) + len(x))
                tree[b, t: t + len(x)], branch[b, t: t + len(x)] = k, j
                places[first[i] + j] = head + list(range(b * T + t, b * T + t + len(x)))
                t += len(x)
    ar = torch.arange(T)
    mask = ((tree[:, :, None] == tree[:, None, :]) & (tree[:, :, None] >= 0) & (ar[:, None] >= ar[None, :])
            & ((branch[:, None, :] == -1) | (branch[:, :, None] == branch[:, None, :])))
    mask |= torch.eye(T, dtype=torch.bool)  # a padding token sees itself (SDPA gives NaN for a row of no keys)
    L = max(map(len, places))
    index = torch.tensor([p + p[-1:] * (L - len(p)) for p in places])  # right-padded with the last place
    return Packed(ids, pos, mask[:, None], index, torch.tensor([len(p) for p in places]))


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Lists of ids -> (B, length or the longest) LongTensor, padded on the right."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s[:length], dtype=torch.long)
    return out


class ListLoader:
    """Endless batches from a list of examples: a fresh seeded permutation each epoch, this rank's share of
    every global batch, and a state_dict (epoch, position) for exact resume. collate(list) -> batch."""

    def __init__(self, items: list, batch_size: int, collate: Callable, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if not items:
            raise ConfigError("no training examples")
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.position = 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def __iter__(self):
        return self

    def __next__(self):
        need = self.batch_size * self.world  # global micro-batch; this rank takes its slice
        picked = []
        while len(picked) < need:
            perm = self._perm(self.epoch)
            take = perm[self.position: self.position + need - len(picked)].tolist()
            picked += take
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        mine = picked[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return self.collate([self.items[i] for i in mine])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def checkpoint_io(model, lora: bool):
    """(save_model, load_model) for the loop's checkpoints: the whole model, or only the adapter of a LoRA run
    (the base weights are those of the run's --model directory)."""
    from lmlab.interop.hf import load_weights
    from lmlab.models.lora import load_adapter, save_adapter

    if lora:
        return (lambda d, sd: save_adapter(model, d)), (lambda m, d: load_adapter(m, d))
    return (lambda d, sd: model.save_pretrained(d)), (lambda m, d: load_weights(m, Path(d)))


def finish(model, tok, out: Path, rc: RunConfig, stage: str, base_dir, report: dict, title: str) -> None:
    """Write final/ (the merged model for LoRA, with the tokenizer and lmlab.json), adapter/ for LoRA runs,
    and report.json + report.md."""
    from lmlab.models.lora import lora_layers, merge_lora, save_adapter

    if not dist.is_main():
        return
    final = out / "final"
    if lora_layers(model):
        save_adapter(model, out / "adapter", base_model_name_or_path=str(base_dir))
        model = merge_lora(copy.deepcopy(model))
    model.save_pretrained(final)
    tok.save_pretrained(final)
    (final / "lmlab.json").write_text(json.dumps({"stage": stage, "base_model": str(base_dir),
                                                  "config": rc.to_dict()}, indent=2))
    write_report(out, report, title)


def write_report(out: Path, report: dict, title: str, images: Sequence[str] = ("plots/loss.png",)) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items())
    figs = "".join(f"![{Path(i).stem}]({i})\n" for i in images if (out / i).exists())
    (out / "report.md").write_text(f"# {title}\n\n| metric | value |\n|---|---|\n{rows}\n\n{figs}")


def world_settings(model_dir) -> dict:
    """The built-in world's seed and size a model was trained on (from its lmlab.json), else the defaults."""
    path = Path(model_dir) / "lmlab.json"
    data = json.loads(path.read_text()).get("config", {}).get("data", {}) if path.exists() else {}
    return {"seed": data.get("world_seed", 0), "n_people": data.get("world_people", 100)}


def world_eval(model, tok, rc: RunConfig, ref=None) -> dict:
    """The built-in world's exact scoring of a chat model (QA accuracy, honesty, gold reward; KL to `ref`),
    on data.world_eval_limit questions per split (0 = all)."""
    from lmlab.data.world import make_world
    from lmlab.eval.world import world_scores

    world = make_world(seed=rc.data.world_seed, n_people=rc.data.world_people)
    return world_scores(model, tok, world, ref, limit=rc.data.world_eval_limit or None)
