"""The one training loop: exact resume, signals, atomic checkpoints, non-finite loss, distributed parity."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.config import RunConfig, apply_overrides, preset
from lmlab.train import loop, pretrain
from lmlab.train.loop import TrainingError

# a small model and run: the test is about the loop, not about learning
SETTINGS = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
            "model.num_attention_heads=4", "model.num_key_value_heads=2", "train.batch_size=4", "train.seq_len=32",
            "train.max_steps=12", "train.warmup_steps=3", "train.eval_every=4", "train.save_every=3",
            "train.eval_batches=2", "data.vocab_size=300", "train.lr=0.003"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = [f"Document {i}: the {['red', 'blue', 'green'][i % 3]} fox number {i * 7} jumps over {i % 5} dogs. " * 4
            for i in range(120)]
    with open(d / "docs.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    return d / "docs.jsonl"


def config(corpus, *extra):
    d = {"model": preset("tiny").to_dict(), "data": {"source": str(corpus)}}
    return RunConfig.from_dict(apply_overrides(d, SETTINGS + list(extra)))


def losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [(r["step"], r["val_loss"]) for r in rows
                                                                    if "val_loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    pretrain.run(config(corpus), out, show_progress=False)
    return out


def test_eval_batches_zero_evaluates_the_whole_validation_split(uninterrupted, corpus):
    model = lmlab.load_model(uninterrupted / "final")
    tokens = {}
    for n in (1, 0):
        t = config(corpus, f"train.eval_batches={n}", "train.seq_len=8").train  # several batches (one at 32)
        _, eval_fn = pretrain.token_loaders(uninterrupted / "data", t, t.batch_size, "test")
        tokens[n] = eval_fn(model)["val_tokens"]
    assert tokens[1] == 4 * 8 < 4 * 4 * 8 < tokens[0], tokens  # one batch of 4 x 8, then every window


def test_run_directory_layout(uninterrupted):
    out = uninterrupted
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md", "plots/loss.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "data/index.json"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000009", "step_000012"]  # keep_last 2
    ckpt = out / "checkpoints" / "step_000012"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng.pt", "loader.json",
                 "trainer_state.json"):
        assert (ckpt / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 12 and report["val_loss"] > 0 and report["val_bpb"] > 0
    train, val = losses(out)
    assert [s for s, _ in train] == list(range(1, 13)) and [s for s, _ in val] == [4, 8, 12]
    assert train[-1][1] < train[0][1]  # it learns something
    # final/ is a plain HF directory: lmlab and transformers load it
    model = lmlab.load_model(out / "final")
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4


def test_resume_is_exact(corpus, uninterrupted, tmp_path):
    first = pretrain.run(config(corpus), tmp_path, stop_at=5, show_progress=False)
    assert first["stopped"] == "stop_at 5" and (tmp_path / "checkpoints" / "step_000005").exists()
    pretrain.run(config(corpus), tmp_path, resume=True, show_progress=False)
    assert losses(tmp_path) == losses(uninterrupted)  # bit for bit, evals included


def test_sigterm_saves_and_resume_continues(corpus, uninterrupted, tmp_path):
    cfg = config(corpus)
    cfg.save_yaml(tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "lmlab", "pretrain", "--config", str(tmp_path / "cfg.yaml"),
           "--data", str(corpus), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM)" in out
    stopped_at = json.loads(out.strip().splitlines()[-1])["step"]
    assert stopped_at < 12 and loop.latest_checkpoint(tmp_path / "run").name == f"step_{stopped_at:06d}"
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert losses(tmp_path / "run") == losses(uninterrupted)


def test_crash_while_saving_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def flaky_save(obj, path, *a, **kw):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain.run(config(corpus), tmp_path, show_progress=False)
    assert loop.latest_checkpoint(tmp_path).name == "step_000003"
    monkeypatch.setattr(torch, "save", real_save)
    summary = pretrain.run(config(corpus), tmp_path, resume=True, show_progress=False)
    assert summary["stopped"] == "completed" and summary["step"] == 12


def test_non_finite_loss_stops_cleanly(corpus, tmp_path, monkeypatch):
    real = pretrain.causal_lm_loss

    def poisoned(model, base):
        fn, calls = real(model, base), {"n": 0}

        def loss_fn(m, batch):
            calls["n"] += 1
            loss, extra = fn(m, batch)
            return (loss * float("nan") if calls["n"] == 8 else loss), extra
        return loss_fn
    monkeypatch.setattr(pretrain, "causal_lm_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 7.*step_000006"):
        pretrain.run(config(corpus), tmp_path, show_progress=False)
    ckpt = loop.latest_checkpoint(tmp_path)
    assert ckpt.name == "step_000006"
    assert torch.isfinite(torch.cat([p.flatten() for p in lmlab.load_model(ckpt).parameters()])).all()


def test_lr_schedule():
    cfg = RunConfig.from_dict({"train": {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}}).train
    assert loop.lr_at(0, cfg) == pytest.approx(0.1) and loop.lr_at(9, cfg) == pytest.approx(1.0)
    assert loop.lr_at(60, cfg) == pytest.approx(0.55) and loop.lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, corpus, uninterrupted, tmp_path):
    """torchrun with 2 gloo processes and the same global batch gives the single-process loss curve."""
    cfg = config(corpus, f"train.distributed={mode}")
    cfg.save_yaml(tmp_path / "cfg.yaml")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lmlab", "pretrain",
                          "--config", str(tmp_path / "cfg.yaml"), "--data", str(corpus), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (one_train, one_val), (two_train, two_val) = losses(uninterrupted), losses(tmp_path / "r")
    assert [s for s, _ in two_train] == [s for s, _ in one_train]
    for (s, a), (_, b) in zip(one_train + one_val, two_train + two_val):
        assert abs(a - b) <= 1e-5, (s, a, b)


def test_grad_accumulation_matches_one_big_batch(corpus, uninterrupted, tmp_path):
    """batch_size is the global batch: 2 accumulation steps of 2 give the curve of 1 step of 4."""
    pretrain.run(config(corpus, "train.grad_accum=2"), tmp_path, show_progress=False)
    for (s, a), (_, b) in zip(*(losses(d)[0] for d in (uninterrupted, tmp_path))):
        assert abs(a - b) <= 1e-5, (s, a, b)


def test_time_budget_and_bf16(corpus, tmp_path, monkeypatch, capsys):
    """bf16 autocast trains, stops at a time budget and resumes; on a device without native bf16 matmul (faked
    here) the loop says that float32 is faster."""
    from lmlab.train import dist

    monkeypatch.setattr(dist, "fast_bf16", lambda *a: False)
    summary = pretrain.run(config(corpus, "train.max_minutes=0.00001", "train.dtype=bfloat16"), tmp_path,
                           show_progress=False)
    assert "no native bf16 matrix instructions" in capsys.readouterr().out
    assert summary["stopped"] == "time budget" and summary["step"] == 1
    assert loop.latest_checkpoint(tmp_path).name == "step_000001"
    summary = pretrain.run(config(corpus, "train.dtype=bfloat16"), tmp_path, resume=True, show_progress=False)
    assert summary["stopped"] == "completed" and summary["loss"] < losses(tmp_path)[0][0][1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_another_world_size(mode, corpus, uninterrupted, tmp_path):
    """A checkpoint from one process resumes under torchrun with two (same global batch): same curve."""
    pretrain.run(config(corpus), tmp_path / "r", stop_at=5, show_progress=False)
    config(corpus, f"train.distributed={mode}").save_yaml(tmp_path / "cfg.yaml")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lmlab", "pretrain", "--resume",
                          "--config", str(tmp_path / "cfg.yaml"), "--data", str(corpus), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    (a_train, a_val), (b_train, b_val) = losses(uninterrupted), losses(tmp_path / "r")
    assert [s for s, _ in b_train] == [s for s, _ in a_train]
    for (s, a), (_, b) in zip(a_train + a_val, b_train + b_val):
        assert abs(a - b) <= 1e-5, (s, a, b)


def test_compiled_training_matches_eager(corpus, uninterrupted, tmp_path):
    """train.compile=true runs the same computation through torch.compile."""
    pretrain.run(config(corpus, "train.compile=true", "train.max_steps=4"), tmp_path, show_progress=False)
    compiled, eager = losses(tmp_path)[0], losses(uninterrupted)[0][:4]
    assert [s for s, _ in compiled] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(compiled, eager[:3]):  # warmup: the same lr in both runs
        assert abs(a - b) <= 1e-4, (s, a, b)


@pytest.mark.parametrize("T,block", [(2, 64), (64, 64), (150, 64), (37, 8)])
def test_block_causal_attention_matches_sdpa(T, block):
    """Compiled CPU training's attention (plain math in blocks of queries, GQA as grouped rows) is SDPA's causal
    attention, forward and backward; in bf16 its error against fp32 is within 1.5x of SDPA's bf16 error at scores
    of +-10 (rounding the scores to bf16 doubles it)."""
    from lmlab.models.layers import causal_attention_blocks
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 16) * 3, torch.randn(2, 2, T, 16) * 3, torch.randn(2, 2, T, 16)
    dy = torch.randn(2, 4, T, 16)

    def run(f, dtype):
        x = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        y = f(*x)
        y.backward(dy.to(dtype))
        return [y.float()] + [t.grad.float() for t in x]

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    def blocks(a, b, c):
        return causal_attention_blocks(a, b, c, 16 ** -0.5, block)

    ref = run(sdpa, torch.float32)
    for name, a, b in zip(["y", "dq", "dk", "dv"], run(blocks, torch.float32), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    err_blocks = (run(blocks, torch.bfloat16)[0] - ref[0]).abs().mean()
    err_sdpa = (run(sdpa, torch.bfloat16)[0] - ref[0]).abs().mean()
    assert err_blocks <= 1.5 * err_sdpa + 1e-6, (err_blocks, err_sdpa)


def test_compiled_forward_takes_block_attention(monkeypatch):
    """Under torch.compile on a CPU a causal forward without a cache runs causal_attention_blocks, with the eager
    (SDPA) forward's logits."""
    from lmlab.models import build, layers
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 100))
    with torch.no_grad():
        eager = model(ids)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model)(ids), eager, atol=1e-4, rtol=1e-4)
        monkeypatch.setattr(layers, "causal_attention_blocks", lambda q, k, v, scale: torch.zeros_like(q))
        torch._dynamo.reset()
        assert (torch.compile(model)(ids) - eager).abs().max() > 0.1  # the branch is the one compiled
    torch._dynamo.reset()


def test_config_file_data_source_is_kept(corpus, tmp_path):
    """--config's data.source is used unless --data is given (the flag's default must not override it)."""
    from lmlab.cli import _run_config, build_parser
    config(corpus).save_yaml(tmp_path / "cfg.yaml")
    args = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "cfg.yaml")])
    assert _run_config(args).data.source == str(corpus)
    args = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "cfg.yaml"), "--data", "world"])
    assert _run_config(args).data.source == "world"
    assert _run_config(build_parser().parse_args(["pretrain"])).data.source == "world"


def test_repeated_set_flags_all_apply():
    """`--set a=1 --set b=2` applies both (argparse's nargs="*" alone keeps only the last flag's values)."""
    from lmlab.cli import _run_config, build_parser
    args = build_parser().parse_args(["pretrain", "--set", "train.lr=5e-5", "--set", "train.max_steps=7",
                                      "train.seed=3"])
    t = _run_config(args).train
    assert (t.lr, t.max_steps, t.seed) == (5e-5, 7, 3)
    for argv in (["sft", "--model", "m"], ["speedrun"]):
        p = build_parser()
        assert p.parse_args([*argv, "--set", "a.b=1", "--set", "c.d=2"]).set == ["a.b=1", "c.d=2"]
        assert p.parse_args(argv).set == []  # the default list is not shared between parses
    p = build_parser()  # every flag of several values: the tokenizer's files and special tokens, LoRA's targets
    args = p.parse_args(["tokenizer", "train", "--out", "o", "--data", "a.txt", "--data", "b.txt", "c.txt",
                         "--special-tokens", "<x>", "--special-tokens", "<y>"])
    assert (args.data, args.special_tokens) == (["a.txt", "b.txt", "c.txt"], ["<x>", "<y>"])
    assert p.parse_args(["tokenizer", "train", "--out", "o", "--data", "a"]).special_tokens is None
    assert p.parse_args(["tokenizer", "train", "--out", "o", "--data", "a", "--special-tokens"]).special_tokens == []
    assert p.parse_args(["sft", "--model", "m", "--lora-targets", "q_proj", "--lora-targets", "v_proj"]
                        ).lora_targets == ["q_proj", "v_proj"]


def test_pretrain_with_a_given_tokenizer(corpus, uninterrupted, tmp_path):
    """data.tokenizer=DIR uses that tokenizer instead of training one."""
    tok_dir = uninterrupted / "final"
    pretrain.run(config(corpus, f"data.tokenizer={tok_dir}", "data.vocab_size=999", "train.max_steps=2"), tmp_path,
                 show_progress=False)
    assert (tmp_path / "final" / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
