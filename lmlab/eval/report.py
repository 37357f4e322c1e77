"""The speedrun's report card: report.md (every stage's metrics, wall times, hardware, the checks, sample
conversations) and report.png (the training curves of every stage), from report.json and the stages'
metrics.jsonl."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

# (stage, metrics.jsonl keys to draw) per panel of report.png
CURVES = (("pretrain", ("loss", "val_loss")), ("sft", ("loss", "val_loss")), ("reward", ("accuracy", "pair_acc")),
          ("dpo", ("reward_accuracy", "val_reward_accuracy")), ("ppo", ("score", "gold_reward")))


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    from lmlab.train.dist import fast_bf16

    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "native_bf16": fast_bf16()}
    if torch.cuda.is_available():
        out["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_curves(out: Path) -> str | None:
    """report.png: one panel per stage that logged metrics; -> the file name, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(stage, keys, _rows(out / stage / "metrics.jsonl")) for stage, keys in CURVES]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (stage, keys, rows) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, label=k)
        ax.set_title(stage)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)
    return "report.png"


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: ""}[v]
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report_card(run) -> Path:
    """report.md (+ report.png) under run.out, from run.report; -> the path of report.md."""
    rep, out = run.report, run.out
    s = rep["stages"]
    hw = rep["hardware"]
    total = sum(v.get("seconds", 0) for v in s.values())
    md = ["# lmlab speedrun: report card\n",
          f"Preset `{rep['preset']}`, data `{rep['data']}`, seed {rep['seed']}. "
          f"Total {total / 60:.1f} min on {hw['cpu']} ({hw['cores']} cores, torch {hw['torch']}"
          f"{', ' + hw['gpu'] if 'gpu' in hw else ''}"
          f"{'' if hw.get('native_bf16', True) else '; no native bf16: the bf16 stages trained in float32'}).\n"]
    from lmlab.speedrun import one_line
    md += ["## Stages\n", _table(["stage", "wall time", "result"],
                                 [[k, f"{v.get('seconds', 0):.0f} s", one_line(k, v)] for k, v in s.items()])]
    if rep["data"] == "world" and "sft" in s:
        p = s.get("pretrain", {})
        models = [("base (pre-trained)", {k[5:]: v for k, v in p.items() if k.startswith("base_")})]
        models += [(name, s[key]) for name, key in (("SFT", "sft"), ("DPO", "dpo"), ("PPO (learned reward)", "ppo"))
                   if key in s]
        md += ["## The lifecycle, scored on the world's truth\n",
               "Greedy answers to the world's questions: people in SFT data (seen), people known only from the "
               "pre-training bios (held-out), and people who are not in the world (unknown).\n",
               _table(["model", "QA seen", "QA held-out", '"I don\'t know" (unknown)', "invented (unknown)",
                       "gold reward", "KL to SFT"],
                      [[n, m.get("qa_acc_seen"), m.get("qa_acc_heldout"), m.get("idk_rate"), m.get("invented_rate"),
                        m.get("gold_reward"), m.get("kl")] for n, m in models])]
    md += ["## Every stage against where it started\n",
           _table(["stage", "metric", "before", "after", "improved"],
                  [[k, c["metric"], c["before"], c["after"], c["ok"]] for k, c in rep.get("checks", {}).items()])]
    png = plot_curves(out)
    if png:
        md += ["## Curves\n", f"![training curves]({png})\n"]
    if rep["data"] == "world" and (out / "final").exists():
        md += ["## Sample conversations (the final model)\n", _samples(run)]
    md += ["## Hardware\n", _table(["", "this run"], [[k, v] for k, v in hw.items()]),
           "## Next\n", f"```\nlmlab chat --model {out / 'final'}\nlmlab serve --model {out / 'final'}\n"
                        f"llama-cli -m {out / 'model.gguf'} -cnv\n```\n"]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _samples(run, n: int = 6) -> str:
    import lmlab
    from lmlab.data.world import make_world
    from lmlab.eval.world import sample_conversations

    final = run.out / "final"
    model, tok = lmlab.load_model(final), lmlab.load_tokenizer(final)
    convs = sample_conversations(model, tok, make_world(seed=run.seed), n=n, seed=run.seed)
    run.report["samples"] = convs
    return "".join(f"- **{c['split']}** · *{c['question']}*  \n  {c['answer'].strip()}  "
                   f"({'right' if c['correct'] else 'wrong'})\n" for c in convs)
