"""Pre-training: documents -> tokenizer -> shards -> the family's objective through the one loop.

    lmlab pretrain --preset tiny --data world --out runs/pretrain
    lmlab pretrain --family encoder --preset tiny --out runs/bert            (masked LM, train/objective_loaders.py)
    lmlab pretrain --family encoder-decoder --preset tiny --out runs/t5      (T5 span corruption)
    lmlab pretrain --family encoder-decoder --arch bart --out runs/bart      (BART denoising, bart-tiny)
    torchrun --nproc_per_node=2 -m lmlab pretrain --preset tiny --data world --out runs/pretrain

The run directory holds config.yaml, data/ (shards + tokenizer), metrics.jsonl, plots/, checkpoints/,
final/ (HF model + tokenizer) and report.json / report.md.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.config import DataConfig, RunConfig
from lmlab.train import dist
from lmlab.train.loop import train
from lmlab.train.posttrain import write_report


def documents(dc: DataConfig, family: str = "decoder") -> list[str]:
    """The text of data.source: the built-in world's pre-training corpus, or files/folders/globs. The encoder
    families' world corpus is the bios plus the texts of the sentiment reviews (no labels), the domain their
    fine-tuning tasks read (a tokenizer trained on bios alone splits most sentiment words into pieces)."""
    if dc.source == "world":
        from lmlab.data.world import make_world
        from lmlab.train.tasks import N_REVIEWS
        if family == "decoder":
            return make_world(seed=dc.world_seed, n_people=dc.world_people).pretrain_docs(mix_qa=dc.world_mix_qa)
        w = make_world(seed=dc.world_seed, n_people=dc.world_people, n_reviews=N_REVIEWS)
        return w.pretrain_docs(mix_qa=False) + [r["text"] for r in w.reviews()]
    from lmlab.data.text import iter_documents
    return list(iter_documents(dc.source, field=dc.field))


# BART's specials (facebook/bart-base's strings) on a byte-level BPE; texts are framed "<s> text </s>"
BART_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "mask_token": "<mask>"}


def train_tokenizer(docs, dc: DataConfig, family: str, show_progress: bool = True, model_type: str | None = None):
    """A tokenizer trained on the documents, with what the family's objective needs: byte-level BPE with the
    chat tokens for decoders, WordPiece ([CLS] [SEP] [MASK] [PAD]) for BERT, SentencePiece unigram with the
    100 sentinels <extra_id_N> for T5, byte-level BPE with <s> </s> <pad> <mask> for BART (data.tokenizer_kind
    picks another kind)."""
    from lmlab.chat import DEFAULT_SPECIAL_TOKENS
    from lmlab.data.objectives import sentinel_tokens
    from lmlab.tokenizer import Tokenizer

    bart = model_type == "bart"
    auto = "bpe" if bart else {"decoder": "bpe", "encoder": "wordpiece", "encoder-decoder": "unigram"}[family]
    kind = auto if dc.tokenizer_kind == "auto" else dc.tokenizer_kind
    special, roles = None, None
    if bart:
        roles = BART_SPECIALS
    elif family == "encoder-decoder":
        special = [*DEFAULT_SPECIAL_TOKENS, *sentinel_tokens(100)]
    elif family == "encoder" and kind != "wordpiece":
        roles = {"mask_token": "<mask>"}
    tok = Tokenizer.train(docs, dc.vocab_size, kind=kind, special_tokens=special, special_roles=roles,
                          show_progress=show_progress)
    if bart:
        tok.set_framing(bos=True, eos=True)
    elif family == "encoder-decoder" and tok.backend == "sentencepiece":  # T5's convention: no bos, text ends with </s>
        tok.set_framing(bos=False, eos=True)
    return tok


def prepare_data(rc: RunConfig, shard_dir: Path, show_progress: bool = True):
    """Tokenizer + shards, made once by rank 0 (reused when the run resumes); -> the tokenizer."""
    from lmlab.data.shards import build_shards
    from lmlab.tokenizer import load_tokenizer

    if dist.is_main() and not (shard_dir / "index.json").exists():
        docs = documents(rc.data, rc.model.family)
        if rc.data.tokenizer == "train":
            tok = train_tokenizer(docs, rc.data, rc.model.family, show_progress, rc.model.model_type)
        else:
            tok = load_tokenizer(rc.data.tokenizer)
        build_shards(docs, tok, shard_dir, val_fraction=rc.data.val_fraction, seed=rc.train.seed,
                     show_progress=show_progress)
    dist.barrier()
    return load_tokenizer(shard_dir / "tokenizer")


def causal_lm_loss(model, base):
    """Mean next-token cross-entropy (+ the MoE load-balancing loss, weighted as in Mixtral)."""
    def loss_fn(step_model, batch):
        x, y = (t.to(base.device) for t in batch)
        logits = step_model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if base.config.num_local_experts:
            aux = base.aux_loss()
            return loss + base.config.router_aux_loss_coef * aux, {"aux_loss": float(aux)}
        return loss, {}
    return loss_fn


@torch.no_grad()
def evaluate_lm(model, loader, max_batches: int | None = None) -> dict:
    """Validation loss, perplexity and bits per UTF-8 byte over the loader's split (all ranks together).

    bpb = summed loss in nats / ln 2 / bytes of text covered, where the windows evaluated cover
    text_bytes * (tokens evaluated / tokens in the split) bytes."""
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for x, y in loader.iter_eval(max_batches):
        logits = model(x.to(model.device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(model.device).flatten(), reduction="sum").cpu()
        count += y.numel()
    total, count = dist.total(total), dist.total(count)
    loss = total / max(count, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": int(count)}
    if loader.text_bytes:
        out["val_bpb"] = total / math.log(2) / (loader.text_bytes * count / max(loader.tokens - 1, 1))
    return out


def flops_per_token(model, seq_len: int) -> float:
    """6 x matmul parameters (the input embedding is a lookup; a tied head is a matmul) + attention."""
    cfg = model.config
    n = model.num_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    if model.pos_embed is not None:
        n -= model.pos_embed.weight.numel()
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * n + attn


def token_loaders(shard_dir: Path, t, micro: int, desc: str):
    """(this rank's training batch loader, eval_fn on the validation split or None when there is none)."""
    from lmlab.data.shards import TokenLoader
    from lmlab.data.text import DataError

    loader = TokenLoader(shard_dir, "train", micro, t.seq_len, t.seed, dist.rank(), dist.world_size())
    try:
        val = TokenLoader(shard_dir, "val", micro, t.seq_len, t.seed, dist.rank(), dist.world_size())
    except DataError as e:
        print(f"[{desc}] no validation: {e}")
        return loader, None
    return loader, lambda m: evaluate_lm(m, val, t.eval_batches)


def objective_loaders(family: str, model, tok, shard_dir: Path, t, dc: DataConfig, micro: int):
    """(loss_fn, training loader, eval_fn) of the encoder families' objectives over the token shards."""
    from lmlab.data.shards import TokenLoader
    from lmlab.data.text import DataError
    from lmlab.train.objective_loaders import CorruptingLoader, evaluate_objective, objective, window_len

    corrupt, loss_fn = objective(family, model, tok, dc)
    L = window_len(family, t.seq_len, dc, model.config.model_type)

    def loader(split):  # raw windows of L tokens: the TokenLoader's (x, y) pairs span L = seq_len + 1
        return CorruptingLoader(TokenLoader(shard_dir, split, micro, L - 1, t.seed, dist.rank(), dist.world_size()),
                                corrupt, t.seed)
    try:
        val = loader("val")
        eval_fn = lambda m: evaluate_objective(m, val, loss_fn, t.eval_batches)  # noqa: E731
    except DataError as e:
        print(f"[pretrain] no validation: {e}")
        eval_fn = None
    return loss_fn, loader("train"), eval_fn


def run(rc: RunConfig, out_dir, resume: bool = False, stop_at: int | None = None, show_progress: bool = True) -> dict:
    from lmlab.interop.hf import load_weights
    from lmlab.models import build

    dist.init()
    out = Path(out_dir)
    t = rc.train
    micro = dist.micro_batch(t)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        rc.save_yaml(out / "config.yaml")
    tok = prepare_data(rc, out / "data", show_progress)
    family = rc.model.family
    mc = rc.model.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id,
                          max_position_embeddings=max(rc.model.max_position_embeddings, t.seq_len))
    if mc.model_type == "bart":  # BART starts decoding from eos, and forces eos at the length limit
        mc = mc.replace(decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    elif family == "encoder-decoder":  # T5 starts decoding from the pad token
        mc = mc.replace(decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(t.seed)  # every rank builds the same initial weights
    model = build(mc)
    if torch.cuda.is_available():
        model = model.cuda()
    if family == "decoder":
        loss_fn, flops = causal_lm_loss(model, model), flops_per_token(model, t.seq_len)
        loader, eval_fn = token_loaders(out / "data", t, micro, "pretrain")
    else:
        flops = None
        loss_fn, loader, eval_fn = objective_loaders(family, model, tok, out / "data", t, rc.data, micro)

    def save_model(d, state_dict):
        target = model
        if state_dict is not None:  # FSDP: the gathered full weights, into a plain CPU copy
            target = build(mc)
            target.load_state_dict(state_dict)
        target.save_pretrained(d)

    summary = train(model, loss_fn, loader, t, out, eval_fn=eval_fn, save_model=save_model,
                    load_model=lambda m, d: load_weights(m, Path(d)), tokenizer=tok, resume=resume,
                    flops_per_token=flops, stop_at=stop_at, desc="pretrain")
    if summary["stopped"] != "completed":
        return summary
    final = out / "final"
    model_sd = dist.full_model_state(model)
    if dist.is_main():
        save_model(final, model_sd)
        tok.save_pretrained(final)
        (final / "lmlab.json").write_text(json.dumps({"stage": "pretrain", "config": rc.to_dict()}, indent=2))
        report = {"stage": "pretrain", "family": family, "val_loss": summary.get("val_loss"), "val_bpb": summary.get("val_bpb"),
                  "val_ppl": summary.get("val_ppl"), "train_loss": summary["loss"], "steps": summary["step"],
                  "seconds": summary["seconds"], "params": model.num_params()}
        write_report(out, report, "Pre-training report")
        summary["report"] = report
    dist.barrier()
    return summary
