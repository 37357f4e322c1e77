"""The main job: the whole lifecycle on the built-in world in one command, then a report card.

    lmlab speedrun                                  # --preset cpu: ~13 minutes on a 2-core laptop CPU
    lmlab speedrun --preset ci --out /tmp/sr        # the reduced run CI does end to end
    lmlab speedrun --resume                         # after an interruption: finished stages are kept
    lmlab speedrun --families all                   # also a BERT and a T5 on the world's tasks

Stages, in order, each a run directory under --out (the stage functions the other verbs call):

    tokenizer  byte-level BPE on the pre-training text            -> tokenizer/
    pretrain   the decoder on the world's bios (+ seen people's QA) -> pretrain/final   (+ the base model's QA)
    sft        instruction tuning                                    -> sft/final
    reward     a reward model from the world's rankings             -> reward/final
    dpo        DPO from the SFT model                                -> dpo/final
    ppo        PPO from the SFT model against the reward model       -> ppo/final
    export     the aligned model with the higher gold reward -> final/ and model.gguf, asked in llama.cpp
    bert, t5   (--families all) masked-LM / span-corruption pre-training, then the world's tasks
    report     report.md + report.png (lmlab/eval/report.py)

report.json is rewritten after every stage (atomically); a stage listed in it is finished, and `--resume`
skips it. The stage that was interrupted resumes from its last checkpoint (every preset saves checkpoints).
Each stage's own metric is checked against where it started (`checks` in report.json): the tokenizer
against raw bytes, pre-training against a uniform guess, SFT against the base model, the reward model
against chance, DPO and PPO against the SFT model, the GGUF file against the question it was asked.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.config import ConfigError, RunConfig, apply_overrides, preset
from lmlab.errors import LmlabError
from lmlab.train.dist import fast_bf16


class Interrupted(LmlabError):
    """A stage's training was stopped before its end; its checkpoint is kept for --resume."""


STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "export")
ENCODER_STAGES = ("bert", "t5")

# Per preset: the decoder's size, the world questions scored per split (0 = all 720), and --set overrides per
# stage on top of each stage's own defaults. Every stage saves checkpoints, so an interrupted stage resumes.
PRESETS = {
    "cpu": {"model": "tiny", "eval_limit": 0,
            "pretrain": ["train.max_steps=600", "train.dtype=bfloat16", "train.eval_every=200",
                         "train.save_every=200"],
            # DPO in bf16: 1.2x faster here, same results. SFT stays fp32: a bf16 SFT model (same QA and gold reward)
            # sent PPO below SFT (docs/speedrun.md), whose result on this preset is within seed noise
            "sft": ["train.save_every=50"], "dpo": ["train.save_every=50", "train.dtype=bfloat16"],
            "ppo": ["train.save_every=80"],
            # the reward model's 1200 steps are the longest stage: bf16 (1.25x here) and one evaluation, at the end
            "reward": ["train.dtype=bfloat16", "train.eval_every=0", "train.save_every=400"],
            # docs/encoders.md: BERT 1000 steps -> sentiment 1.00; T5 400 steps (T5_PRETRAIN), then QA + sentiment
            "bert": ["train.max_steps=1000", "train.dtype=bfloat16"], "bert_task": [],
            "t5": ["train.max_steps=400", "train.dtype=bfloat16"], "t5_task": []},
    # CI: bios-only pre-training (the seen people's QA is left to SFT, so SFT's effect is clear in a short run)
    "ci": {"model": "tiny", "eval_limit": 40,
           "pretrain": ["train.max_steps=400", "train.dtype=bfloat16", "train.eval_every=0", "train.save_every=100",
                        "data.world_mix_qa=false"],
           "sft": ["train.save_every=50"], "reward": ["train.max_steps=200", "train.save_every=50"],
           "dpo": ["train.save_every=50"], "ppo": ["train.save_every=80"],
           "bert": ["train.max_steps=400", "train.dtype=bfloat16"], "bert_task": ["train.max_steps=300"],
           "t5": ["train.max_steps=200", "train.dtype=bfloat16"], "t5_task": ["train.max_steps=300"]},
    "gpu": {"model": "small", "eval_limit": 0,
            "pretrain": ["train.max_steps=3000", "train.batch_size=32", "train.dtype=bfloat16", "train.compile=true",
                         "train.lr=1e-3", "train.eval_every=500", "train.save_every=500"],
            "sft": ["train.max_steps=300", "train.save_every=100"],
            "reward": ["train.save_every=400"],
            "dpo": ["train.max_steps=200", "train.save_every=100"], "ppo": ["train.max_steps=480", "train.save_every=160"],
            "bert": ["train.max_steps=4000", "train.dtype=bfloat16"], "bert_task": [],
            "t5": ["train.max_steps=4000", "train.dtype=bfloat16"], "t5_task": []},
}


@dataclass
class Speedrun:
    out: Path
    preset: str = "cpu"
    data: str = "world"  # world | a folder as `lmlab data world --out DIR` writes (pretrain/sft/preferences.jsonl)
    families: str = "decoder"
    resume: bool = False
    overrides: list = field(default_factory=list)  # "STAGE.section.key=value"
    seed: int = 0
    report: dict = field(default_factory=dict)

    @property
    def world(self) -> bool:
        return self.data == "world"

    def source(self, split: str) -> str:
        """data.source of a stage: the world, or the split's file in the --data folder."""
        if self.world:
            return "world"
        path = Path(self.data) / f"{split}.jsonl"
        if not path.exists():
            raise ConfigError(f"--data {self.data}: no {path.name} (the folder needs pretrain.jsonl, sft.jsonl and "
                              f"preferences.jsonl, as `lmlab data world --out DIR` writes)")
        return str(path)

    def config(self, stage: str, defaults: dict, source: str, model: dict | None = None, extra=()) -> RunConfig:
        """A stage's config: its module's defaults, the world settings, the preset's overrides, `extra`, then the
        user's (--set STAGE.section.key=value)."""
        d = {section: dict(values) for section, values in defaults.items()}
        if model is not None:
            d["model"] = model
        d.setdefault("train", {})["seed"] = self.seed
        d.setdefault("data", {}).update(source=source, world_seed=self.seed,
                                        world_eval_limit=PRESETS[self.preset]["eval_limit"])
        ours = PRESETS[self.preset].get(stage, [])
        if not fast_bf16():  # bf16 emulated in scalar code (no AVX-512 / AMX): the preset's bf16 stages in fp32
            ours = [o.replace("train.dtype=bfloat16", "train.dtype=float32") for o in ours]
        mine = [o.split(".", 1)[1] for o in self.overrides if o.startswith(stage + ".")]
        return RunConfig.from_dict(apply_overrides(d, [*ours, *extra, *mine]))

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def result(self, stage: str) -> dict:
        return self.report["stages"][stage]


# ------------------------------------------------------------------------------------------ stages
def stage_tokenizer(run: Speedrun) -> dict:
    from lmlab.train.pretrain import documents, train_tokenizer

    rc = run.config("pretrain", {}, run.source("pretrain"))
    docs = documents(rc.data, "decoder")
    tok = train_tokenizer(docs, rc.data, "decoder")
    tok.save_pretrained(run.stage_dir("tokenizer"))
    sample = docs[:2000]
    n_bytes = sum(len(d.encode()) for d in sample)
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in sample)
    roundtrip = all(tok.decode(tok.encode(d, add_special_tokens=False)) == d for d in sample[:200])
    return {"vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / n_tokens, "roundtrip": roundtrip,
            "documents": len(docs)}


def stage_pretrain(run: Speedrun) -> dict:
    from lmlab.train import pretrain

    model = preset(PRESETS[run.preset]["model"]).to_dict()
    rc = run.config("pretrain", {"data": {"tokenizer": str(run.stage_dir("tokenizer"))}}, run.source("pretrain"),
                    model)
    rep = _completed("pretrain", pretrain.run(rc, run.stage_dir("pretrain"), resume=run.resume))
    tokens = run.result("tokenizer")
    out = {k: rep[k] for k in ("val_loss", "val_bpb", "train_loss", "steps", "params")}
    out["uniform_bpb"] = math.log2(tokens["vocab_size"]) / tokens["bytes_per_token"]  # a uniform guess per token
    if run.world:  # the base model's answers (the scoring every later stage ends with), what SFT is measured against
        import lmlab
        from lmlab.train.posttrain import world_eval

        final = run.stage_dir("pretrain") / "final"
        scores = world_eval(lmlab.load_model(final), lmlab.load_tokenizer(final), rc)
        out |= {f"base_{k}": scores[k] for k in ("qa_acc_seen", "qa_acc_heldout", "idk_rate", "invented_rate",
                                                  "gold_reward")}
    return out


def _post(run: Speedrun, stage: str, module, model_dir, source: str, extra=(), **kw) -> dict:
    rc = run.config(stage, module.DEFAULTS, source, extra=extra)
    rep = _completed(stage, module.run(rc, model_dir, run.stage_dir(stage), resume=run.resume, **kw))
    return {k: v for k, v in rep.items() if isinstance(v, (int, float, str)) and k != "stage"}


def _completed(stage: str, summary: dict) -> dict:
    """A stage's report, or a clear stop when its training loop was stopped (Ctrl-C, SIGTERM, time budget)."""
    if summary["stopped"] != "completed":
        raise Interrupted(f"{stage} stopped ({summary['stopped']}) at step {summary['step']}; its checkpoint is saved: "
                          f"run the same command with --resume to continue")
    return summary["report"]


def stage_sft(run: Speedrun) -> dict:
    from lmlab.train import sft
    return _post(run, "sft", sft, run.stage_dir("pretrain") / "final", run.source("sft"))


def stage_reward(run: Speedrun) -> dict:
    from lmlab.train import reward
    return _post(run, "reward", reward, run.stage_dir("sft") / "final", run.source("preferences"))


def stage_dpo(run: Speedrun) -> dict:
    from lmlab.train import dpo
    return _post(run, "dpo", dpo, run.stage_dir("sft") / "final", run.source("preferences"))


def stage_ppo(run: Speedrun) -> dict:
    from lmlab.train import ppo
    return _post(run, "ppo", ppo, run.stage_dir("sft") / "final", run.source("preferences"),
                 extra=[f"ppo.reward_model={run.stage_dir('reward') / 'final'}"], show_progress=False)


def stage_export(run: Speedrun) -> dict:
    """The final model -> final/ and model.gguf; on the world, llama.cpp (when llama-cpp-python is installed)
    answers questions the model answers right. The final model is the aligned one (DPO or PPO) with the higher
    gold reward among those that kept at least half of the SFT model's accuracy on the seen people's questions
    (a policy that over-optimised its reward model can raise the gold reward by saying nothing); DPO when
    neither or when there is no world to score."""
    import lmlab

    pick = "dpo"
    if run.world:
        sft = run.result("sft")
        kept = [k for k in ("dpo", "ppo") if run.result(k)["qa_acc_seen"] >= 0.5 * sft["qa_acc_seen"]]
        pick = max(kept, key=lambda k: run.result(k)["gold_reward"], default="dpo")
    final = run.out / "final"
    tmp = run.out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run.stage_dir(pick) / "final", tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    gguf = lmlab.export_gguf(final, run.out / "model.gguf", dtype="f16")
    out = {"model": pick, "gguf": str(gguf), "gguf_mib": gguf.stat().st_size / 2**20}
    if run.world:
        out |= _ask_llamacpp(run, final, gguf)
    return out


def _ask_llamacpp(run: Speedrun, model_dir: Path, gguf: Path, n: int = 4) -> dict:
    """Up to n seen-people questions that lmlab's model answers right, asked of llama.cpp running the GGUF file
    (its own chat template rendering from the file; greedy) -> the fraction it answers right, and one example."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("[export] llama-cpp-python is not installed (pip install llama-cpp-python): GGUF not run")
        return {"gguf_checked": False}
    import lmlab
    from lmlab.data.world import make_world
    from lmlab.eval.world import answer_questions
    from lmlab.interop.gguf import llamacpp_chat

    world = make_world(seed=run.seed)
    records = world.eval_questions("seen")[:40]
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    ours = answer_questions(model, tok, [r["question"] for r in records])
    asked = [r for r, a in zip(records, ours) if world.check_answer(r, a)][:n]
    if not asked:
        return {"gguf_checked": False}
    theirs = llamacpp_chat(gguf, [r["question"] for r in asked])
    right = [world.check_answer(r, a) for r, a in zip(asked, theirs)]
    return {"gguf_checked": True, "gguf_asked": len(asked), "gguf_acc": sum(right) / len(asked),
            "gguf_question": asked[0]["question"], "gguf_answer": theirs[0]}


# The T5 stage's pre-training (docs/encoders.md): with T5's span targets (and at the decoders' lr 2e-3 or at 3e-4)
# a tiny T5 ignores its encoder after 400 steps and then answers no question (QA 0.00, sentiment 0.50); with the
# whole text as targets at lr 3e-4 it copies from the encoder and then reads (QA 0.20, sentiment 0.59 after 600
# fine-tuning steps, as from random weights).
T5_PRETRAIN = {"train": {"lr": 3e-4}, "data": {"span_targets": "text"}}


def _encoder_family(run: Speedrun, stage: str, family: str, task: str, recipe: dict | None = None) -> dict:
    from lmlab.config import FAMILY_DEFAULTS
    from lmlab.train import pretrain, tasks

    defaults = {"train": {}, "data": {"tokenizer": "train"}}
    for section, values in [*FAMILY_DEFAULTS.get(family, {}).items(), *(recipe or {}).items()]:
        defaults[section].update(values)  # what `lmlab pretrain --family` uses, then the stage's own recipe
    rc = run.config(stage, defaults, "world", preset("tiny", family).to_dict())
    pre = _completed(stage, pretrain.run(rc, run.stage_dir(stage) / "pretrain", resume=run.resume))
    trc = run.config(f"{stage}_task", tasks.DEFAULTS[task], "world")
    rep = _completed(f"{stage} {task}", tasks.run(trc, run.stage_dir(stage) / "pretrain" / "final",
                                                  run.stage_dir(stage) / task, task, resume=run.resume))
    return {"pretrain_val_loss": pre["val_loss"], "pretrain_seconds": pre["seconds"],
            **{k: v for k, v in rep.items() if isinstance(v, (int, float)) and k != "steps"}}


def stage_bert(run: Speedrun) -> dict:
    return _encoder_family(run, "bert", "encoder", "classify")


def stage_t5(run: Speedrun) -> dict:
    return _encoder_family(run, "t5", "encoder-decoder", "seq2seq", T5_PRETRAIN)


# ------------------------------------------------------------------------------------------ the run
def checks(run: Speedrun) -> dict:
    """Each finished stage's own metric against where it started -> {stage: {metric, before, after, ok}}."""
    s, out = run.report["stages"], {}

    def check(stage, metric, before, after, higher=True):
        if stage in s and before is not None and after is not None:
            out[stage] = {"metric": metric, "before": before, "after": after,
                          "ok": bool(after > before if higher else after < before)}
    check("tokenizer", "bytes per token (raw bytes: 1)", 1.0, s.get("tokenizer", {}).get("bytes_per_token"))
    p = s.get("pretrain", {})
    check("pretrain", "validation bits per byte (uniform guess before)", p.get("uniform_bpb"), p.get("val_bpb"),
          higher=False)
    if run.world:
        check("sft", "gold reward (base model before)", p.get("base_gold_reward"), s.get("sft", {}).get("gold_reward"))
        for stage in ("dpo", "ppo"):
            check(stage, "gold reward (SFT model before)", s.get("sft", {}).get("gold_reward"),
                  s.get(stage, {}).get("gold_reward"))
        e = s.get("export", {})
        if e.get("gguf_checked"):
            check("export", "llama.cpp accuracy on questions lmlab answers right", 0.0, e["gguf_acc"])
    else:
        check("dpo", "held-out preference accuracy (chance before)", 0.5, s.get("dpo", {}).get("val_reward_accuracy"))
    check("reward", "held-out pair accuracy (chance before)", 0.5, s.get("reward", {}).get("pair_acc"))
    # BERT: sentiment accuracy against a coin flip; T5: exact match of extractive answers (a guess never matches)
    for stage, key, metric, chance in (("bert", "accuracy", "held-out sentiment accuracy (chance before)", 0.5),
                                       ("t5", "exact_match_extractive-qa", "held-out QA exact match (0 before)", 0.0)):
        if stage in s and key in s[stage]:
            check(stage, metric, chance, s[stage][key])
    order = STAGES + ENCODER_STAGES
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))


def _save_report(run: Speedrun) -> None:
    run.report["checks"] = checks(run)
    run.report["total_seconds"] = sum(v.get("seconds", 0) for v in run.report["stages"].values())
    tmp = run.out / "report.json.tmp"
    tmp.write_text(json.dumps(run.report, indent=2))
    os.replace(tmp, run.out / "report.json")


def speedrun(out="runs/speedrun", preset_name: str = "cpu", data: str = "world", families: str = "decoder",
             resume: bool = False, overrides=(), seed: int = 0) -> dict:
    """Run every stage not yet finished; -> report.json's content. See the module docstring."""
    from lmlab.eval.report import hardware, write_report_card

    if preset_name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, not {preset_name!r}")
    if families not in ("decoder", "all"):
        raise ConfigError(f"--families must be decoder or all, not {families!r}")
    if data != "world" and not Path(data).is_dir():
        raise ConfigError(f"--data {data}: not a folder (world, or a folder with pretrain.jsonl, sft.jsonl and "
                          f"preferences.jsonl as `lmlab data world --out DIR` writes)")
    for o in overrides:
        if o.split(".", 1)[0] not in STAGES + ENCODER_STAGES + ("bert_task", "t5_task") or o.count(".") < 2:
            raise ConfigError(f"--set {o}: expected STAGE.section.key=value with STAGE one of "
                              f"{', '.join(STAGES + ENCODER_STAGES)} (e.g. pretrain.train.max_steps=100)")
    out = Path(out)
    run = Speedrun(out, preset_name, data, families, resume, list(overrides), seed)
    path = out / "report.json"
    if path.exists():
        if not resume:
            raise ConfigError(f"{out} already holds a speedrun (report.json): pass --resume to continue it, or "
                              f"choose another --out")
        run.report = json.loads(path.read_text())
        made = {k: run.report.get(k) for k in ("preset", "data", "seed")}
        if made != {"preset": preset_name, "data": data, "seed": seed}:
            raise ConfigError(f"{path}: made with --preset {made['preset']} --data {made['data']} --seed "
                              f"{made['seed']}; resume it with the same options")
        run.report["families"] = families  # --families all may add the encoder stages to a finished run
    elif out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"{out} is not empty: pass --resume to continue an interrupted speedrun, or choose "
                          f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not run.report:
        run.report = {"preset": preset_name, "data": data, "families": families, "seed": seed, "stages": {}}
    run.report["hardware"] = hardware()
    if not run.report["hardware"]["native_bf16"]:
        print("[speedrun] this CPU has no native bf16 matrix instructions (AVX-512 or AMX): the preset's bf16 "
              "stages train in float32 (bf16 would be ~50x slower here)")
    todo = STAGES + (ENCODER_STAGES if families == "all" else ())
    fns = {name: globals()[f"stage_{name}"] for name in todo}
    for name in todo:
        if name in run.report["stages"]:
            print(f"[speedrun] {name}: done earlier, kept")
            continue
        print(f"[speedrun] {name} ...", flush=True)
        start = time.time()
        result = fns[name](run)
        result["seconds"] = round(time.time() - start, 1)
        run.report["stages"][name] = result
        _save_report(run)
        print(f"[speedrun] {name} done in {result['seconds']:.0f} s: {one_line(name, result)}", flush=True)
    write_report_card(run)
    _save_report(run)
    checks = run.report["checks"]
    missed = [f"{k} ({c['metric']}: {c['before']:.3g} -> {c['after']:.3g})" for k, c in checks.items() if not c["ok"]]
    print(f"[speedrun] finished in {run.report['total_seconds'] / 60:.1f} min; {len(checks) - len(missed)} of "
          f"{len(checks)} stages improved their own metric{'; not improved: ' + ', '.join(missed) if missed else ''}. "
          f"Report card: {out / 'report.md'}")
    print(f"  chat:   lmlab chat --model {out / 'final'}\n  serve:  lmlab serve --model {out / 'final'}  "
          f"(then open http://127.0.0.1:8000)\n  llama.cpp:  llama-cli -m {out / 'model.gguf'} -cnv")
    return run.report


KEYS = {"tokenizer": ("vocab_size", "bytes_per_token"), "pretrain": ("val_loss", "val_bpb", "base_qa_acc_seen"),
        "sft": ("qa_acc_seen", "qa_acc_heldout", "idk_rate", "gold_reward"), "reward": ("pair_acc",),
        "dpo": ("gold_reward", "kl", "qa_acc_heldout"), "ppo": ("gold_reward", "kl", "qa_acc_heldout"),
        "export": ("model", "gguf_mib", "gguf_acc"), "bert": ("accuracy",),
        "t5": ("exact_match_extractive-qa", "exact_match_sentiment")}


def one_line(stage: str, result: dict) -> str:
    parts = [f"{k} {result[k]:.3g}" if isinstance(result[k], float) else f"{k} {result[k]}"
             for k in KEYS.get(stage, ()) if k in result]
    return ", ".join(parts)
