"""`lmlab speedrun --preset ci`: the whole lifecycle on the built-in world, end to end, scored on its known truth
(~15 minutes on this 2-core CPU).

The run is killed (SIGKILL) in the middle of its SFT stage and continued with `--resume`, so the one run also
checks that resuming keeps the finished stages and continues the interrupted one from its checkpoint. The ci
preset pre-trains a tiny Llama on the world's bios only (no QA mixed in, so the base model cannot yet answer in
the chat format), then SFT, a reward model, DPO and PPO (against the reward model) from the SFT model, the
GGUF export asked in llama.cpp, and the report card. Each assertion states what was measured (one seed; 40
questions per split). The cpu preset's numbers are in docs/benchmarks.md and docs/posttraining.md.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import lmlab
from lmlab.cli import main
from lmlab.data.world import make_world
from lmlab.train.dist import fast_bf16

RUN = [sys.executable, "-m", "lmlab", "speedrun", "--preset", "ci"]
# Where the CPU has no native bf16 (AVX2 only), the preset pre-trains in fp32 (bf16 is emulated there, ~50x slower)
# and that run ends with another SFT model. Measured 2026-11-30 on an AVX2 EPYC: QA seen 0.675 (0.325 on the
# AVX-512 machine the numbers below come from), gold reward -0.414 (-0.735); on it DPO lowers the gold reward in
# 3 of 3 seeds (-0.444, -0.484, -0.606; lr 1e-5: -0.458, beta 0.3: -0.478) and the oracle PPO gains 0.012 (seed 1:
# 0.102; 0.32 there). PPO with the learned reward model does improve it (-0.321).
FP32_PRETRAIN = not fast_bf16()
FP32_REASON = ("on a CPU without native bf16 the ci preset pre-trains in fp32, and DPO / the oracle PPO do not "
               "improve that run's stronger SFT model (measured numbers at FP32_PRETRAIN)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first_log = out.parent / "first.log"  # a file, not a pipe: a full pipe would stall the run
    with open(first_log, "wb") as f:
        first = subprocess.Popen([*RUN, "--out", str(out)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    deadline = time.time() + 1200
    while not list((out / "sft" / "checkpoints").glob("step_*/trainer_state.json")):
        assert first.poll() is None, first_log.read_text()[-3000:]
        assert time.time() < deadline, "no SFT checkpoint within 20 minutes"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # as a power cut would: no clean stop
    first.wait()
    killed = json.loads((out / "report.json").read_text())
    pretrained = (out / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns
    second = subprocess.run([*RUN, "--out", str(out), "--resume"], capture_output=True, text=True, env=env,
                            timeout=1800)
    log = second.stdout + second.stderr
    print(log[-4000:])
    report = json.loads((out / "report.json").read_text())
    print(json.dumps(report["stages"], indent=1))
    return {"out": out, "report": report, "stages": report["stages"], "killed": killed, "log": log,
            "rc": second.returncode, "pretrain_mtime": pretrained}


def test_resume_after_a_kill_keeps_finished_stages(run):
    """Killed during SFT: the tokenizer and pre-training were finished and are kept (pre-training's weights are
    not rewritten); SFT continues from its step-50 checkpoint instead of starting over."""
    assert list(run["killed"]["stages"]) == ["tokenizer", "pretrain"]
    assert "[speedrun] tokenizer: done earlier, kept" in run["log"]
    assert "[speedrun] pretrain: done earlier, kept" in run["log"]
    assert (run["out"] / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == run["pretrain_mtime"]
    assert "[sft] resumed from" in run["log"], run["log"][-3000:]
    steps = [json.loads(line)["step"] for line in (run["out"] / "sft" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == run["stages"]["sft"]["steps"]  # no step logged twice


def test_report_has_every_stage_and_the_design_keys(run):
    rep, stages = run["report"], run["stages"]
    assert list(stages) == ["tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "export"]
    need = {"pretrain": {"val_loss", "val_bpb"}, "sft": {"qa_acc_seen", "qa_acc_heldout", "idk_rate", "gold_reward"},
            "reward": {"pair_acc"}, "ppo": {"gold_reward", "kl", "qa_acc_heldout"},
            "dpo": {"gold_reward", "kl", "qa_acc_heldout"}}
    for stage, keys in need.items():
        assert keys | {"seconds"} <= set(stages[stage]), (stage, stages[stage])
    assert rep["total_seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert rep["hardware"]["cores"] == os.cpu_count() and rep["hardware"]["torch"]
    md = (run["out"] / "report.md").read_text()
    for section in ("## Stages", "## The lifecycle, scored on the world's truth", "## Every stage against where",
                    "## Curves", "## Sample conversations", "## Hardware"):
        assert section in md, section
    assert (run["out"] / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rep["samples"]) == 6 and all(s["question"] in md for s in rep["samples"])
    # the final model: the aligned one with the higher gold reward among those that kept at least half of SFT's
    # seen-people QA accuracy (measured: PPO's gold reward is higher, -0.34 against -0.62, but it answers nothing
    # right, so DPO is picked); it is what the report's commands load
    kept = [k for k in ("dpo", "ppo") if stages[k]["qa_acc_seen"] >= 0.5 * stages["sft"]["qa_acc_seen"]]
    assert stages["export"]["model"] == max(kept, key=lambda k: stages[k]["gold_reward"], default="dpo")
    assert f"lmlab chat --model {run['out'] / 'final'}" in run["log"]


def test_every_stage_improved_its_own_metric(run):
    """Measured: bytes/token 1 -> 5.2; validation bits/byte 1.96 (uniform) -> 0.41; gold reward -1.25 (base) ->
    -0.735 (SFT); reward pairs 0.5 -> 0.627; gold reward -0.735 (SFT) -> -0.615 (DPO), -0.404 (PPO); llama.cpp
    answered 4/4 questions right."""
    checks = run["report"]["checks"]
    assert set(checks) == {"tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "export"}
    missed = {k for k, c in checks.items() if not c["ok"]}
    assert missed <= ({"dpo"} if FP32_PRETRAIN else set()), checks  # FP32_PRETRAIN: see FP32_REASON
    assert run["rc"] == (1 if missed else 0)


def test_sft_teaches_the_seen_people_qa(run):
    """Measured: QA on SFT people 0.025 (base, bios only) -> 0.325 after 150 SFT steps."""
    p, sft = run["stages"]["pretrain"], run["stages"]["sft"]
    assert sft["qa_acc_seen"] >= p["base_qa_acc_seen"] + 0.2, (p, sft)


def test_reward_model_ranks_held_out_pairs(run):
    """Measured: pair accuracy 0.627 on 2480 held-out pairs (chance 0.5, one standard error 0.01). About known
    people, "I don't know" beats a wrong fact in 0.87 of the held-out prompts; the right fact beats the wrong one
    in only 0.53 and "I don't know" in 0.15: this model knows a third of the seen people's facts (QA 0.325), and
    its reward model learns caution, not checking (the cpu preset's, 1200 steps, checks facts: right > wrong
    0.96; docs/posttraining.md)."""
    from lmlab.data.prefs import encode_ranking, load_rankings, split_rankings
    from lmlab.data.world import IDK, REPLY_PREFIX
    from lmlab.train.reward import pair_accuracy

    assert run["stages"]["reward"]["pair_acc"] >= 0.6, run["stages"]["reward"]
    rm_dir = run["out"] / "reward" / "final"
    rm, tok = lmlab.load_model(rm_dir), lmlab.load_tokenizer(rm_dir)
    _, val = split_rankings(load_rankings("world"), 0.1, seed=0)
    world = make_world()
    known = [(r, name) for r in val for name, _, person in [world.parse_prompt(r["prompt"])]
             if person is not None and -1.0 in r["scores"]]  # attribute questions about known people
    pairs = [{"prompt": r["prompt"], "responses": [REPLY_PREFIX + IDK.format(name=name),
                                                   r["responses"][r["scores"].index(-1.0)]]}
             for r, name in known]  # ("I don't know", the wrong fact)
    assert len(pairs) >= 100 and all(p["responses"][0] in r["responses"] for p, (r, _) in zip(pairs, known))
    acc = pair_accuracy(rm, [encode_ranking(tok, p) for p in pairs], tok.pad_token_id)["pair_acc"]
    assert acc >= 0.7, acc


@pytest.mark.xfail(FP32_PRETRAIN, reason=FP32_REASON, strict=False)
def test_dpo_raises_gold_reward_with_bounded_kl(run):
    """Measured: gold reward -0.735 (SFT) -> -0.615 (DPO), KL 1.76 nats per response."""
    sft, dpo = run["stages"]["sft"], run["stages"]["dpo"]
    assert dpo["gold_reward"] > sft["gold_reward"], (sft, dpo)
    assert 0 < dpo["kl"] < 5


def test_ppo_with_the_learned_reward_model_raises_gold_reward(run):
    """Measured: with the learned reward model (no oracle) PPO raises the gold reward -0.735 (SFT) -> -0.674, KL 0.70,
    mostly on the people it was asked about (seen: gold -0.231 -> -0.144, QA 0.325 -> 0.35; held-out -0.942 -> -0.848).
    Before the exact KL term (ppo.kl_loss_coef) it reached -0.404 at KL 9.8 by answering with text that states
    nothing (-0.25 and a style penalty beat -1 for a wrong fact), which this reward model, paying for caution and
    unable to check facts (above), scores high."""
    sft, ppo = run["stages"]["sft"], run["stages"]["ppo"]
    assert ppo["gold_reward"] > sft["gold_reward"] + 0.03, (sft, ppo)
    assert ppo["gold_reward_seen"] > sft["gold_reward_seen"], (sft, ppo)
    assert 0 < ppo["kl"] < 5


@pytest.mark.xfail(FP32_PRETRAIN, reason=FP32_REASON, strict=False)
def test_ppo_with_the_gold_reward_raises_it_with_bounded_kl(run, tmp_path):
    """PPO itself works: with the world's gold reward as the reward (an oracle) and no exact KL term, the
    evaluation's gold reward goes -0.735 (SFT) -> -0.414, KL 4.5 with kl_coef 0.1 (mostly by answering evasively
    instead of wrongly: -0.25 beats -1). The term holds the policy near SFT, which on this weak SFT model also holds
    the oracle back (ppo.kl_loss_coef 1.0, the default: -0.676 at KL 0.54; 0.3: -0.769)."""
    from lmlab.config import RunConfig, apply_overrides
    from lmlab.train import ppo

    d = {section: dict(values) for section, values in ppo.DEFAULTS.items()}
    rc = RunConfig.from_dict(apply_overrides(d, ["data.world_eval_limit=40", "ppo.reward_model=world-gold",
                                                   "ppo.kl_loss_coef=0"]))
    rep = ppo.run(rc, run["out"] / "sft" / "final", tmp_path / "ppo", show_progress=False)["report"]
    assert rep["gold_reward"] > run["stages"]["sft"]["gold_reward"] + 0.1, (run["stages"]["sft"], rep)
    assert rep["rollout_gold_reward_last"] > rep["rollout_gold_reward_first"]
    assert 0 < rep["kl"] < 10


def test_the_exported_gguf_answers_world_questions_in_llamacpp(run):
    """The speedrun asked llama.cpp (running model.gguf, f16, with the file's own chat template) seen-people
    questions the final model answers right: measured 4/4 right."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (test extra) runs the exported file")
    e = run["stages"]["export"]
    assert e["gguf_checked"] and e["gguf_asked"] >= 2 and e["gguf_acc"] >= 0.75, e
    assert make_world().check_answer(next(r for r in make_world().eval_questions("seen")
                                          if r["question"] == e["gguf_question"]), e["gguf_answer"])


def test_the_sft_model_runs_in_llamacpp_token_for_token(run, tmp_path):
    """A model lmlab trained with its own tokenizer, exported to GGUF (f32): llama.cpp renders the chat from the
    file's template to lmlab's ids and decodes the same greedy tokens."""
    import numpy as np
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (test extra) runs the exported file")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lmlab.chat import encode_chat, stop_token_ids
    sft_dir = run["out"] / "sft" / "final"
    model, tok = lmlab.load_model(sft_dir), lmlab.load_tokenizer(sft_dir)
    path = lmlab.export_gguf(sft_dir, tmp_path / "sft.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    meta, stops = llm.metadata, set(stop_token_ids(tok))
    bos, eos = (llm.detokenize([int(meta[f"tokenizer.ggml.{r}_token_id"])], special=True).decode() for r in ("bos", "eos"))
    fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    for q in make_world().eval_questions("seen")[:4]:
        messages = [{"role": "user", "content": q["question"]}]
        ids = llm.tokenize(fmt(messages=messages).prompt.encode(), add_bos=False, special=True)
        assert ids == encode_chat(tok, messages, add_generation_prompt=True)[0]
        llm.reset()
        llm.eval(ids)
        theirs = []
        while len(theirs) < 40 and (not theirs or theirs[-1] not in stops):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(theirs[-1:])
        ours = lmlab.generate(model, ids, max_new_tokens=len(theirs), temperature=0.0)
        assert theirs == ours[:len(theirs)], (q["question"], tok.decode(theirs), tok.decode(ours))


def test_speedrun_refuses_to_overwrite_or_bad_options(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"preset": "ci", "data": "world", "seed": 0, "stages": {}}))
    assert main(["speedrun", "--preset", "ci", "--out", str(out)]) == 2
    assert "already holds a speedrun" in capsys.readouterr().err
    for other in (["--preset", "cpu"], ["--preset", "ci", "--seed", "1"]):
        assert main(["speedrun", *other, "--out", str(out), "--resume"]) == 2
        assert "resume it with the same options" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "x"), "--set", "train.max_steps=5"]) == 2
    assert "STAGE.section.key=value" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "y"), "--data", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_speedrun_on_a_data_folder(tmp_path):
    """--data DIR: every stage reads the folder's files (pretrain.jsonl, sft.jsonl, preferences.jsonl, written here
    by `lmlab data world` and cut down), nothing is scored on the world, and the final model is DPO's. A few steps
    per stage: this checks the wiring, the world run above checks the learning."""
    from lmlab.data.world import write_world

    data = tmp_path / "data"
    paths = write_world(data)
    for split, keep in (("sft", 200), ("preferences", 40)):
        lines = paths[split].read_text().splitlines()[:keep]
        paths[split].write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    sets = ["pretrain.train.max_steps=20", "sft.train.max_steps=5", "reward.train.max_steps=5", "dpo.train.max_steps=5",
            "ppo.train.max_steps=8", "ppo.ppo.rollout_batch=8", "ppo.ppo.max_new_tokens=8"]
    main(["speedrun", "--preset", "ci", "--data", str(data), "--out", str(out), "--set", *sets])
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["stages"]) == ["tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "export"]
    for stage, split in (("pretrain", "pretrain"), ("sft", "sft"), ("reward", "preferences"), ("dpo", "preferences"), ("ppo", "preferences")):
        assert f"source: {data / split}.jsonl" in (out / stage / "config.yaml").read_text(), stage
    assert rep["stages"]["reward"]["val_pairs"] < 100  # the cut-down rankings, not the world's 1286 held-out pairs
    assert "qa_acc_seen" not in rep["stages"]["sft"] and "base_gold_reward" not in rep["stages"]["pretrain"]
    assert rep["stages"]["export"]["model"] == "dpo" and "dpo" in rep["checks"] and "sft" not in rep["checks"]
    assert lmlab.load_model(out / "final").num_params() == rep["stages"]["pretrain"]["params"]
    assert (out / "model.gguf").stat().st_size > 0 and "## Sample conversations" not in (out / "report.md").read_text()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_stages_train_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, tmp_path, native):
    """Where a CPU multiplies bf16 only in PyTorch's scalar fallback (AVX2: 1 GFLOP/s against 84 in fp32), the
    preset's bf16 stages train in fp32; a user's own --set train.dtype=bfloat16 is kept either way."""
    from lmlab import speedrun as sr

    monkeypatch.setattr(sr, "fast_bf16", lambda *a: native)
    run = sr.Speedrun(tmp_path, "cpu", overrides=["dpo.train.dtype=bfloat16"])
    dtype = {stage: run.config(stage, {}, "world").train.dtype for stage in ("pretrain", "reward", "dpo", "sft")}
    want = "bfloat16" if native else "float32"
    assert dtype == {"pretrain": want, "reward": want, "dpo": "bfloat16", "sft": "float32"}


def test_fast_bf16_matches_this_cpus_bf16_matmul_speed():
    """fast_bf16 says whether bf16 products run natively: where it says no, a bf16 matmul is several times slower
    than fp32 (the scalar fallback); where it says yes, it is not."""
    import torch

    from lmlab.train.dist import fast_bf16

    a32 = torch.randn(256, 256)
    a16 = a32.bfloat16()

    def best(a):
        a @ a
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)
    slower = best(a16) / best(a32)
    assert (slower > 4) == (not fast_bf16("cpu")), f"bf16 matmul {slower:.1f}x the time of fp32"
