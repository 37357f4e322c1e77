"""What the post-training stages (finetune, sft, reward, dpo, ppo) share.

- `load_trainable`: a model directory -> a model in training mode, with LoRA adapters if lora.r > 0;
- `token_logprobs`: log p(token_t | tokens_<t) for every position, the quantity DPO and PPO work on;
- `ListLoader`: an in-memory data set as an endless, shuffled, resumable batch iterator for the one loop;
- `checkpoint_io` / `finish`: what a checkpoint and the run's final/ (+ adapter/) hold, and report files.
"""
from __future__ import annotations

import copy
import json
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


def by_length(fn, lengths: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """(N,) values of N right-padded rows, computed `rows` rows at a time in order of length: fn(index (n,),
    length) -> (n,) for those rows cut to `length` (their longest). A batch of preference data mixes 25- and
    120-token responses, and one padded forward spends most of its time on padding (2x slower on a CPU).
    The same values as one forward, up to rounding."""
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.cat([fn(idx, int(lengths[idx[0]])) for idx in order.split(rows)])
    return out[torch.argsort(order).to(out.device)]


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
