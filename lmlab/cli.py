"""The `lmlab` command: one subcommand per verb; each is thin and calls into the package."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    import torch

    import lmlab

    model = lmlab.load_model(args.model, dtype=getattr(torch, args.dtype))
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, compile=args.compile)
    if args.num_beams > 1:
        if model.config.family != "encoder-decoder":
            raise SystemExit("error: --num-beams is for encoder-decoder models (T5); decoders sample or decode greedily")
        kw |= {"num_beams": args.num_beams}
    if args.ids is not None:
        ids = [int(t) for t in args.ids.split(",") if t.strip()]
        for tok in lmlab.stream(model, ids, **kw):
            print(tok, end=" ", flush=True)
    else:
        tok = lmlab.load_tokenizer(args.tokenizer or args.model)
        if args.chat:
            kw["messages"] = [{"role": "user", "content": args.prompt}]
        else:
            kw["prompt"] = args.prompt
        for piece in lmlab.stream(model, tok, **kw):
            print(piece, end="", flush=True)
    print()
    return 0


def _chat(args) -> int:
    import signal

    import torch

    import lmlab
    from lmlab.serve.terminal import chat_loop, check_chat_model

    model = lmlab.load_model(args.model, dtype=getattr(torch, args.dtype))
    check_chat_model(model)  # before the tokenizer: an encoder directory may not have a chat-capable one
    tok = lmlab.load_tokenizer(args.model)
    # Ctrl-C must reach the chat even when whoever started it ignores SIGINT (a job started in the background by a
    # shell or under nohup inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return chat_loop(model, tok, system=args.system, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, name=args.model)


def _embed(args) -> int:
    import sys

    import lmlab

    texts = args.text or [line.rstrip("\n") for line in sys.stdin]
    model = lmlab.load_model(args.model)
    if model.config.family != "encoder":
        raise SystemExit(f"error: {args.model} is a {model.config.family} model; embed needs an encoder (BERT/RoBERTa)")
    vectors = lmlab.embed(model, lmlab.load_tokenizer(args.model), texts, normalize=not args.no_normalize,
                          batch_size=args.batch_size)
    for v in vectors.tolist():
        print(json.dumps([round(x, 7) for x in v]))
    return 0


def _tokenizer(args) -> int:
    import lmlab
    from lmlab.tokenizer import Tokenizer

    if args.action == "train":
        tok = Tokenizer.train(args.data, args.vocab_size, kind=args.kind, special_tokens=args.special_tokens)
        tok.save_pretrained(args.out)
        print(f"trained a {args.kind} tokenizer with {tok.vocab_size} tokens -> {args.out}")
        return 0
    tok = lmlab.load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, add_special_tokens=not args.no_special)
    print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0


def _run_config(args):
    """Preset -> model.* (+ the family's train/data defaults), then --config FILE, then --set overrides;
    data/tokenizer flags as data.*."""
    from lmlab.config import FAMILY_DEFAULTS, RunConfig, apply_overrides

    family, arch = getattr(args, "family", None), getattr(args, "arch", None)
    d = {"model": _preset(args.preset, family, arch).to_dict(), "train": {}, "data": {}}
    for section, values in FAMILY_DEFAULTS.get(family, {}).items():
        d[section].update(values)
    if args.config:
        loaded = RunConfig.load_yaml(args.config).to_dict()
        for section in d:
            d[section].update(loaded.get(section, {}))
    # flags given on the command line win over --config; unset ones keep the config's (or the default)
    d["data"].update({k: v for k, v in (("source", args.data), ("tokenizer", args.tokenizer)) if v is not None})
    if args.max_minutes:
        d["train"]["max_minutes"] = args.max_minutes
    return RunConfig.from_dict(apply_overrides(d, args.set))


def _preset(name: str, family: str | None, arch: str | None):
    """The preset of `--preset NAME`; for the encoder-decoder family `--arch bart` looks up bart-NAME first (as
    `--family` looks up t5-NAME), and a preset of the other architecture is refused."""
    from lmlab.config import PRESETS, ConfigError, preset

    if arch not in (None, "t5") and family != "encoder-decoder":
        raise ConfigError(f"--arch {arch} is for --family encoder-decoder")
    if family != "encoder-decoder" or arch in (None, "t5"):
        cfg = preset(name, family)
    else:
        cfg = preset(f"{arch}-{name}" if f"{arch}-{name}" in PRESETS else name, family)
    if arch is not None and family == "encoder-decoder" and cfg.model_type != arch:
        raise ConfigError(f"preset {name!r} is a {cfg.model_type} model, not --arch {arch}")
    return cfg


def _pretrain(args) -> int:
    from lmlab.train import pretrain

    if args.out is None:
        arch = f"{args.arch}-" if args.family == "encoder-decoder" and args.arch != "t5" else ""
        args.out = f"runs/pretrain-{arch}{args.preset}"
    summary = pretrain.run(_run_config(args), args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "report"}))
    return 0


def _stage_config(args, defaults: dict):
    """Stage defaults, then --config FILE, then flags, then --set. The built-in world's seed and size follow
    the base model's lmlab.json unless set, so every stage scores the world the model was trained on."""
    from lmlab.config import RunConfig, apply_overrides
    from lmlab.train.posttrain import world_settings

    d = {section: dict(values) for section, values in defaults.items()}
    if args.config:
        loaded = RunConfig.load_yaml(args.config).to_dict()
        for section, values in loaded.items():
            if section != "model":
                d.setdefault(section, {}).update(values)
    world = world_settings(args.model)
    d.setdefault("data", {}).setdefault("world_seed", world["seed"])
    d["data"].setdefault("world_people", world["n_people"])
    if args.data is not None:
        d["data"]["source"] = args.data
    if args.max_minutes:
        d.setdefault("train", {})["max_minutes"] = args.max_minutes
    lora = {"r": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.lora_targets}
    d.setdefault("lora", {}).update({k: v for k, v in lora.items() if v is not None})
    if isinstance(d["lora"].get("targets"), list) and len(d["lora"]["targets"]) == 1 and \
            any(c in d["lora"]["targets"][0] for c in "*.^$[("):
        d["lora"]["targets"] = d["lora"]["targets"][0]  # one regex over full module paths
    return RunConfig.from_dict(apply_overrides(d, args.set))


def _stage(args) -> int:
    import importlib

    task = getattr(args, "task", "lm")
    if task != "lm":  # encoder families: classification (BERT) or text-to-text (T5) fine-tuning
        from lmlab.train import tasks
        rc = _stage_config(args, tasks.DEFAULTS[task])
        summary = tasks.run(rc, args.model, args.out or f"runs/finetune-{task}", task, resume=args.resume)
        print(json.dumps(summary.get("report") or {k: v for k, v in summary.items() if k != "report"}))
        return 0
    module = importlib.import_module(f"lmlab.train.{args.verb}")
    rc = _stage_config(args, module.DEFAULTS)
    if args.verb == "ppo" and args.reward_model:
        rc.ppo.reward_model = args.reward_model
    out = args.out or f"runs/{args.verb}"
    kw = {"ref_dir": args.ref} if args.verb in ("dpo", "ppo") else {}
    summary = module.run(rc, args.model, out, resume=args.resume, **kw)
    print(json.dumps(summary.get("report") or {k: v for k, v in summary.items() if k != "report"}))
    return 0


def _eval(args) -> int:
    from lmlab.eval import run_eval

    # every task's options; run_eval passes each task only those it takes (None = the task's default)
    result = run_eval(args.model, args.task, data=args.data, batch_size=args.batch_size, seq_len=args.seq_len,
                      ref=args.ref, world_seed=args.world_seed, people=args.people, limit=args.limit,
                      max_new_tokens=args.max_new_tokens)
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


def _data(args) -> int:
    from lmlab.data.world import write_world

    paths = write_world(args.out, seed=args.seed, n_people=args.people)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _merge_lora(args) -> int:
    import lmlab
    from lmlab.models.lora import load_adapter, merge_lora

    model = merge_lora(load_adapter(lmlab.load_model(args.model), args.adapter))
    model.save_pretrained(args.out)
    try:
        lmlab.load_tokenizer(args.model).save_pretrained(args.out)
    except lmlab.LmlabError:
        pass  # a model directory without a tokenizer
    print(f"merged {args.adapter} into {args.model} -> {args.out}")
    return 0


def _info(args) -> int:
    import lmlab

    model = lmlab.load_model(args.model)
    print(json.dumps({"params": model.num_params(), **model.config.to_dict()}, indent=2))
    return 0


def _serve(args) -> int:
    import uvicorn

    from lmlab.serve.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    app = create_app(args.model, api_key=args.api_key, model_id=args.model_id, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, max_len=args.max_len)
    server = app.state.server
    print(f"serving {server.model_id} ({server.family}) on http://{args.host}:{args.port}  chat page: /  "
          f"API: /v1 (docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _export(args) -> int:
    import lmlab

    out = lmlab.export_gguf(args.model, args.out, dtype=args.dtype, name=args.name)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}); run it with llama.cpp: "
          f"llama-cli -m {out}  (or Ollama / LM Studio)")
    return 0


def _speedrun(args) -> int:
    from lmlab.speedrun import speedrun

    report = speedrun(args.out, args.preset, args.data, args.families, args.resume, args.set, args.seed)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


def _values(parser, flag: str, nargs: str = "+", **kw) -> None:
    """A flag of several values that may also repeat: `--set a=1 --set b=2` keeps both (argparse's nargs alone
    keeps only the last flag's values, silently)."""
    parser.add_argument(flag, nargs=nargs, action="extend", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab", description="Build, train, align and serve language models.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    sr = sub.add_parser("speedrun", help="the main job: the whole lifecycle on the built-in world, then a report card",
                        description="tokenizer -> pre-training -> SFT -> reward model -> DPO and PPO -> evaluation -> "
                        "GGUF export -> report.md. Exit status 1 if a stage did not improve its own metric.",
                        formatter_class=fmt)
    sr.add_argument("--out", default="runs/speedrun", help="run directory (one folder per stage, report.md)")
    sr.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "ci"],
                    help="cpu: the tiny model in ~13 min on 2 cores; gpu: the small model, longer; ci: reduced")
    sr.add_argument("--data", default="world", help="world, or a folder with pretrain.jsonl, sft.jsonl and "
                    "preferences.jsonl (as `lmlab data world --out DIR` writes)")
    sr.add_argument("--families", default="decoder", choices=["decoder", "all"],
                    help="all: also pre-train and fine-tune a BERT (sentiment) and a T5 (extractive QA)")
    sr.add_argument("--resume", action="store_true", help="continue an interrupted run: finished stages are kept")
    sr.add_argument("--seed", type=int, default=0, help="world and training seed")
    _values(sr, "--set", "*", default=[], metavar="STAGE.KEY=VALUE",
            help="override a stage's config, e.g. pretrain.train.max_steps=100 reward.train.lr=3e-4")
    sr.set_defaults(func=_speedrun)

    g = sub.add_parser("generate", help="continue a prompt with a model directory", formatter_class=fmt)
    g.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the model directory's tokenizer)")
    src.add_argument("--ids", help="prompt token ids, comma-separated (prints new ids)")
    g.add_argument("--chat", action="store_true", help="treat --prompt as a user message and apply the chat template")
    g.add_argument("--tokenizer", help="tokenizer directory, if not the model directory")
    g.add_argument("--compile", action="store_true", help="compile the decode step (faster after ~20-60 s)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (encoder-decoder models)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="talk to a model directory in the terminal (chat template, streamed replies)",
                       description="Chat with a decoder model directory: each message is added to the conversation, "
                                   "rendered with the tokenizer's chat template (lmlab's ChatML if it has none) and "
                                   "answered token by token. At the prompt: /reset, /system TEXT, /help, /quit. "
                                   "Ctrl-C stops a reply (the turn is not kept); Ctrl-D or Ctrl-C at the prompt "
                                   "leaves.", formatter_class=fmt)
    c.add_argument("--model", required=True, help="decoder model directory with its tokenizer (Hugging Face layout)")
    c.add_argument("--system", default=None, help="system prompt (change it in the chat with /system TEXT)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    c.add_argument("--max-new-tokens", type=int, default=256,
                   help="reply length limit in tokens; the oldest turns are dropped when the conversation no "
                        "longer fits the model's context with this much room left")
    c.add_argument("--seed", type=int, default=None, help="random seed for sampling (each reply uses it)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    c.set_defaults(func=_chat)

    em = sub.add_parser("embed", help="sentence embeddings of an encoder (mean-pooled); one JSON list per text",
                        formatter_class=fmt)
    em.add_argument("--model", required=True, help="encoder model directory (BERT/RoBERTa, e.g. sentence-transformers)")
    em.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the vectors")
    em.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    em.add_argument("text", nargs="*", help="texts to embed (default: one per line of stdin)")
    em.set_defaults(func=_embed)

    t = sub.add_parser("tokenizer", help="train a tokenizer or encode text", formatter_class=fmt)
    tsub = t.add_subparsers(dest="action", metavar="ACTION", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer on text files", formatter_class=fmt)
    _values(tt, "--data", required=True, help="text files (.txt, one document or line per line)")
    tt.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    tt.add_argument("--kind", default="bpe", choices=["bpe", "sp-bpe", "unigram", "wordpiece"],
                    help="bpe: byte-level BPE; sp-bpe/unigram: SentencePiece; wordpiece: BERT")
    _values(tt, "--special-tokens", "*", default=None,
            help="extra special tokens (default: the chat tokens of lmlab's template)")
    tt.add_argument("--out", required=True, help="output directory")
    te = tsub.add_parser("encode", help="print the ids and tokens of a text", formatter_class=fmt)
    te.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    te.add_argument("--no-special", action="store_true", help="do not add bos/eos or [CLS]/[SEP]")
    te.add_argument("text", help="the text to encode")
    t.set_defaults(func=_tokenizer)

    p_ = sub.add_parser("pretrain", help="pre-train a model on the built-in world or your text", formatter_class=fmt)
    p_.add_argument("--family", default="decoder", choices=["decoder", "encoder", "encoder-decoder"],
                    help="decoder (next-token LM), encoder (BERT, masked LM) or encoder-decoder (T5 span corruption, "
                    "or BART denoising with --arch bart)")
    p_.add_argument("--arch", default="t5", choices=["t5", "bart"],
                    help="encoder-decoder architecture: t5 (span corruption, SentencePiece with sentinels) or bart "
                    "(text infilling + sentence permutation, byte-level BPE with <s> </s> <pad> <mask>)")
    p_.add_argument("--preset", default="tiny", help="model preset: tiny, small, llama-50m, gpt2-124m, llama-1b, ...; "
                    "encoder: tiny (bert-tiny), bert-base; encoder-decoder: tiny (t5-tiny or, with --arch bart, "
                    "bart-tiny), t5-small")
    p_.add_argument("--data", default=None,
                    help="'world' or a .txt/.jsonl/.parquet file, folder or glob (default: data.source, 'world')")
    p_.add_argument("--tokenizer", default=None,
                    help="'train' (on the data) or a tokenizer/model directory (default: data.tokenizer, 'train')")
    p_.add_argument("--out", default=None, help="run directory (default: runs/pretrain-PRESET)")
    p_.add_argument("--config", default=None, help="a YAML run config (model/train/data sections)")
    _values(p_, "--set", "*", default=[], metavar="KEY=VALUE",
            help="overrides such as train.max_steps=200 model.hidden_size=128")
    p_.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p_.add_argument("--max-minutes", type=float, default=0.0, help="time budget (0 = none)")
    p_.set_defaults(func=_pretrain)

    stages = {
        "finetune": ("continue training a model on new text (full or LoRA)",
                     "'world' or .txt/.jsonl/.parquet files, folders, globs"),
        "sft": ("instruction-tune a model on conversations (loss on assistant tokens)",
                "'world' or .jsonl with 'messages' (chat) or 'instruction'/'input'/'output' (alpaca)"),
        "reward": ("train a reward model (scalar head, Bradley-Terry) on preferences",
                   "'world' or .jsonl with prompt + chosen/rejected, or prompt + responses (ranked, best first)"),
        "dpo": ("align a model directly on preference pairs (DPO / IPO)",
                "'world' or .jsonl with prompt + chosen/rejected, or prompt + responses (ranked)"),
        "ppo": ("RLHF: optimise a model against a reward model with PPO",
                "'world' or .jsonl with a 'prompt' field (string or messages)"),
    }
    for verb, (summary, data_help) in stages.items():
        s_ = sub.add_parser(verb, help=summary, description=summary)
        s_.add_argument("--model", required=True, help="the model directory to start from")
        s_.add_argument("--data", default=None, help=f"{data_help} (default: data.source, 'world')")
        s_.add_argument("--out", default=None, help=f"run directory (default: runs/{verb})")
        s_.add_argument("--config", default=None, help="a YAML run config (train/data/lora/... sections)")
        _values(s_, "--set", "*", default=[], metavar="KEY=VALUE",
                help="overrides such as train.lr=1e-5 train.max_steps=50 dpo.beta=0.2")
        s_.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        s_.add_argument("--max-minutes", type=float, default=0.0, help="time budget in minutes (default 0 = none)")
        if verb != "reward":
            s_.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (lora.r; default 0 = full fine-tuning)")
            s_.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha; updates are scaled alpha/r (lora.alpha; default 16)")
            s_.add_argument("--lora-dropout", type=float, default=None, help="dropout on the LoRA input (lora.dropout; default 0)")
            _values(s_, "--lora-targets", default=None,
                    help="module names (q_proj v_proj ...) or one regex over module paths (lora.targets; "
                         "default: every attention and MLP projection)")
        else:
            s_.set_defaults(lora_rank=None, lora_alpha=None, lora_dropout=None, lora_targets=None)
        if verb == "finetune":
            s_.add_argument("--task", default="lm", choices=["lm", "classify", "seq2seq"],
                            help="lm: next-token loss on text; classify: a classification head on an encoder "
                                 "(.jsonl text + label; world: sentiment reviews); seq2seq: text-to-text with a T5 "
                                 "(.jsonl input + target; world: extractive QA and sentiment)")
        if verb in ("dpo", "ppo"):
            s_.add_argument("--ref", default=None, help="reference model directory (default: a frozen copy of --model)")
        if verb == "ppo":
            s_.add_argument("--reward-model", default=None, help="reward model directory (ppo.reward_model)")
        s_.set_defaults(func=_stage)

    e = sub.add_parser("eval", help="evaluate a model directory; prints one JSON object", formatter_class=fmt)
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--task", default="perplexity", choices=["perplexity", "world-qa", "world-gold", "reward"],
                   help="perplexity: loss/ppl/bpb on text; world-qa: QA accuracy on seen/held-out people, "
                        "idk/invented rates for unknown people, gold reward; world-gold: gold reward (+ kl with --ref)")
    e.add_argument("--data", default="world", help="'world' or text files (perplexity)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="sequences per batch (None: 8 for perplexity, 32 for the world tasks)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (perplexity)")
    e.add_argument("--ref", default=None, help="world-gold: reference model dir (e.g. the SFT model); adds 'kl', a "
                                               "Monte-Carlo estimate of KL(model || ref) per sampled response")
    e.add_argument("--world-seed", type=int, default=None, help="world tasks: world seed (None: from lmlab.json)")
    e.add_argument("--people", type=int, default=None, help="world tasks: people in the world (None: from lmlab.json)")
    e.add_argument("--limit", type=int, default=None, help="world tasks: at most this many questions per split")
    e.add_argument("--max-new-tokens", type=int, default=64, help="world tasks: answer length limit in tokens")
    e.add_argument("--out", default=None, help="also write the JSON result to this file")
    e.set_defaults(func=_eval)

    d = sub.add_parser("data", help="data sets", formatter_class=fmt)
    dsub = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    dw = dsub.add_parser("world", help="write the built-in world's data sets as jsonl", formatter_class=fmt)
    dw.add_argument("--out", required=True, help="output directory")
    dw.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    dw.add_argument("--people", type=int, default=100, help="number of people in the world")
    d.set_defaults(func=_data)

    m = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model (a plain model dir)",
                       formatter_class=fmt)
    m.add_argument("--model", required=True, help="base model directory")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, PEFT layout)")
    m.add_argument("--out", required=True, help="output model directory")
    m.set_defaults(func=_merge_lora)

    sv = sub.add_parser("serve", help="an OpenAI-compatible API (continuous batching) and a chat page",
                        formatter_class=fmt)
    sv.add_argument("--model", required=True, help="model directory (a decoder; an encoder serves /v1/embeddings)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback only by default)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    sv.add_argument("--model-id", default=None, help="the model's name in the API (default: the run/directory name)")
    sv.add_argument("--max-batch", type=int, default=32, help="requests decoded together (KV cache rows)")
    sv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which the server answers 429")
    sv.add_argument("--max-len", type=int, default=None,
                    help="KV cache length per row (default: the model's context)")
    sv.add_argument("--log-level", default="info", help="uvicorn log level")
    sv.set_defaults(func=_serve)

    x = sub.add_parser("export", help="export a model directory for other runtimes", formatter_class=fmt)
    xsub = x.add_subparsers(dest="format", metavar="FORMAT", required=True)
    xg = xsub.add_parser("gguf", help="a GGUF file that llama.cpp, Ollama and LM Studio run (model + tokenizer + "
                         "chat template)", formatter_class=fmt)
    xg.add_argument("--model", required=True, help="model directory (Llama, Mistral, Mixtral, Qwen2, GPT-2, BERT)")
    xg.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    xg.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                    help="weight type; norms and biases stay f32, q8_0 falls back to f16 for rows not a multiple of 32")
    xg.add_argument("--name", default=None, help="general.name in the file (default: the run or directory name)")
    x.set_defaults(func=_export)

    i = sub.add_parser("info", help="print a model directory's config and parameter count", formatter_class=fmt)
    i.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    from lmlab.errors import LmlabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (LmlabError, ValueError, FileNotFoundError) as e:
        print(f"lmlab {args.verb}: error: {e}", file=sys.stderr)
        return 2
