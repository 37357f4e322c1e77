"""Fine-tuning: continue next-token training of a model directory on new text, full or LoRA.

    lmlab finetune --model runs/pretrain-tiny/final --data notes/*.txt --out runs/ft
    lmlab finetune --model DIR --data corpus.jsonl --lora-rank 8 --lora-targets q_proj v_proj

The text is tokenized with the model's own tokenizer into shards (as pre-training does), and trained
with the same loss; final/ holds the (merged) model, adapter/ the PEFT adapter of a LoRA run.
"""
from __future__ import annotations

from pathlib import Path

from lmlab.config import ConfigError, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import checkpoint_io, finish, load_trainable
from lmlab.train.pretrain import causal_lm_loss, prepare_data, token_loaders

DEFAULTS = {"train": {"max_steps": 200, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 50,
                      "save_every": 100}}


def run(rc: RunConfig, model_dir, out_dir, resume: bool = False, stop_at: int | None = None) -> dict:
    dist.init()
    out, t = Path(out_dir), rc.train
    micro = dist.micro_batch(t)
    model, _ = load_trainable(model_dir, rc)
    if t.seq_len > model.config.max_position_embeddings and model.config.position == "learned":
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds the model's {model.config.max_position_embeddings} "
                          f"positions")
    rc.model = model.config
    rc.data.tokenizer = str(model_dir)  # the model's own tokenizer, never a new one
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    tok = prepare_data(rc, out / "data")
    loader, eval_fn = token_loaders(out / "data", t, micro, "finetune")
    save_model, load_model = checkpoint_io(model, lora=rc.lora.r > 0)
    summary = train(model, causal_lm_loss(model, model), loader, t, out, eval_fn=eval_fn, save_model=save_model,
                    load_model=load_model, tokenizer=tok, resume=resume, stop_at=stop_at, desc="finetune")
    if summary["stopped"] != "completed":
        return summary
    report = {"stage": "finetune", "val_loss": summary.get("val_loss"), "val_bpb": summary.get("val_bpb"),
              "train_loss": summary["loss"], "steps": summary["step"], "seconds": summary["seconds"],
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    finish(model, tok, out, rc, "finetune", model_dir, report, "Fine-tuning report")
    summary["report"] = report
    return summary
