"""Evaluation tasks behind `lmlab eval`: each returns a flat dict of metrics."""
from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

from lmlab.eval.world import world_gold_task, world_qa_task


def perplexity(model_dir, data="world", batch_size: int = 8, seq_len: int = 256) -> dict:
    """Loss, perplexity and bits per UTF-8 byte of a model on every document of `data`: for "world", the whole
    pre-training corpus, training documents included (a pre-training run's report.json has its held-out split's)."""
    import lmlab
    from lmlab.config import DataConfig
    from lmlab.data.shards import TokenLoader, build_shards
    from lmlab.train.pretrain import documents, evaluate_lm

    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    docs = documents(DataConfig(source=data))
    seq_len = min(seq_len, model.config.max_position_embeddings)
    with tempfile.TemporaryDirectory() as tmp:
        build_shards(docs, tok, tmp, val_fraction=0.0, show_progress=False)
        loader = TokenLoader(tmp, "train", batch_size, seq_len)
        out = evaluate_lm(model, loader)
    return {"loss": out["val_loss"], "ppl": out["val_ppl"], "bpb": out.get("val_bpb"), "tokens": out["val_tokens"]}


def reward(model_dir, data="world", batch_size: int = 16) -> dict:
    """Pairwise accuracy of a reward model: on the held-out pairs of the run that trained it, or on every
    pair of a preference .jsonl file."""
    from lmlab.train.reward import evaluate
    return evaluate(model_dir, data, batch_size)


TASKS = {"perplexity": perplexity, "world-qa": world_qa_task, "world-gold": world_gold_task, "reward": reward}


def run_eval(model_dir, task: str, **kw) -> dict:
    """{"task": task, **metrics}. Options the task does not take, and options set to None (= the task's
    default), are dropped, so one command line can carry every task's flags."""
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; choose from {sorted(TASKS)}")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: not a model directory")
    params = list(inspect.signature(TASKS[task]).parameters.values())[1:]  # the options after model_dir
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    kw = {k: v for k, v in kw.items() if v is not None and (takes_all or k in {p.name for p in params})}
    return {"task": task, **TASKS[task](model_dir, **kw)}
