"""Evaluation tasks behind `lmlab eval`: each returns a flat dict of metrics."""
from __future__ import annotations

import tempfile
from pathlib import Path


def perplexity(model_dir, data="world", batch_size: int = 8, seq_len: int = 256) -> dict:
    """Loss, perplexity and bits per UTF-8 byte of a model on text (the world's validation documents by
    default: the held-out split of a pre-training run on the world, with the same seed)."""
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


TASKS = {"perplexity": perplexity}


def run_eval(model_dir, task: str, **kw) -> dict:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: not a model directory")
    return {"task": task, **TASKS[task](model_dir, **kw)}
