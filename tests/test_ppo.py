"""RLHF with PPO: GAE, the clipped losses and the KL controller against hand-computed values; rollouts against an
independent log-prob computation; a world run end to end with exact resume; and learning on an easy reward."""
import json
import math

import pytest
import torch

import lmlab
from lmlab.config import RunConfig
from lmlab.data.world import make_world
from lmlab.models.heads import ScalarHead
from lmlab.tokenizer import Tokenizer
from lmlab.train import ppo
from lmlab.train.posttrain import token_logprobs

WORLD = {"seed": 0, "n_people": 20}  # preference prompts: 10 SFT people x 7 + 30 unknown names = 100


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread avoids OpenMP hand-offs that dominate (and, on a busy machine, stall)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- pure functions
def test_gae_matches_a_direct_loop():
    torch.manual_seed(0)
    B, R, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values = torch.randn(B, R), torch.randn(B, R)  # padded entries hold garbage: they must not count
    lengths = [6, 3, 1]
    mask = (torch.arange(R) < torch.tensor(lengths)[:, None]).float()
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        last, expected = 0.0, [0.0] * R
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0  # the episode ends after the last token
            last = float(rewards[b, t]) + gamma * next_v - float(values[b, t]) + gamma * lam * last
            expected[t] = last
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([expected[t] + float(values[b, t]) for t in range(n)], abs=1e-5)
        assert not ret[b, n:].any()
    w = ppo.whiten(adv, mask)
    n = mask.sum()
    assert float((w * mask).sum() / n) == pytest.approx(0.0, abs=1e-6)
    assert float((w ** 2 * mask).sum() / n) == pytest.approx(1.0, abs=1e-4)
    assert not (w * (1 - mask)).any()


def test_ppo_loss_hand_computed():
    """Three response tokens (two in row 0, one in row 1) and three padded ones holding absurd values.
    Every real token has p = 0.5 under the new policy (logits [0, 0]); old log-probs give ratios 1.5, 0.5, 1.1."""
    ln = math.log
    pad_logits = [5.0, -5.0]
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], pad_logits], [[0.0, 0.0], pad_logits, pad_logits]])
    tokens = torch.tensor([[0, 1, 1], [0, 1, 1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old_logp = torch.tensor([[ln(0.5 / 1.5), ln(0.5 / 0.5), 0.0], [ln(0.5 / 1.1), 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 100.0], [-2.0, 100.0, 100.0]])
    values = torch.tensor([[0.5, 0.0, 100.0], [1.0, 100.0, 100.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    returns = torch.tensor([[1.0, -1.0, -100.0], [0.5, -100.0, -100.0]])
    loss, s = ppo.ppo_loss(logits, tokens, old_logp, adv, values, old_values, returns, mask, clip=0.2,
                           clip_value=0.2, vf_coef=0.1)
    # policy: max(-A r, -A clip(r, 0.8, 1.2)) per token:
    #   r=1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped);  r=0.5, A=1: max(-0.5, -0.8) = -0.5;  r=1.1, A=-2: 2.2
    #   pg_loss = (-1.2 - 0.5 + 2.2) / 3 = 0.5 / 3;  clipfrac = 1/3 (only the first token)
    assert s["pg_loss"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert s["clipfrac"] == pytest.approx(1 / 3, abs=1e-6)
    # value: clipped v = old + clip(v - old, +-0.2) = [0.2, 0.0, 0.7]
    #   unclipped (v - R)^2 = [0.25, 1.0, 0.25], clipped = [0.64, 1.0, 0.04]; max = [0.64, 1.0, 0.25]
    #   vf_loss = 0.5 * 1.89 / 3 = 0.315;  vf_clipfrac = 1/3
    assert s["vf_loss"] == pytest.approx(0.315, abs=1e-6)
    assert s["vf_clipfrac"] == pytest.approx(1 / 3, abs=1e-6)
    assert float(loss) == pytest.approx(0.5 / 3 + 0.1 * 0.315, abs=1e-6)
    # approx KL = mean 0.5 (log r)^2; entropy of a fair coin = ln 2
    assert s["approx_kl"] == pytest.approx(0.5 * (ln(1.5) ** 2 + ln(0.5) ** 2 + ln(1.1) ** 2) / 3, abs=1e-6)
    assert s["entropy"] == pytest.approx(ln(2), abs=1e-6)
    # gradients reach only the real tokens' logits and values
    logits.requires_grad_(True)
    values.requires_grad_(True)
    ppo.ppo_loss(logits, tokens, old_logp, adv, values, old_values, returns, mask)[0].backward()
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, 0].abs().sum() == 0  # token 0 is clipped
    assert not logits.grad[0, 2].any() and not values.grad[1, 1:].any()


def test_exact_kl_matches_torch_distributions():
    """The loss's KL term: KL(pi || ref) over the whole vocabulary per response position, a masked mean; zero for
    the reference itself; gradients only at real tokens."""
    from torch.distributions import Categorical, kl_divergence

    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    per_position = kl_divergence(Categorical(logits=logits), Categorical(logits=ref))  # (2, 3)
    assert float(ppo.exact_kl(logits, ref, mask)) == pytest.approx(float(per_position[mask.bool()].mean()), abs=1e-6)
    assert float(ppo.exact_kl(ref + 3.0, ref, mask)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    logits.requires_grad_(True)
    ppo.exact_kl(logits, ref, mask).backward()
    assert logits.grad[0, 0].abs().sum() > 0 and not logits.grad[0, 2].any() and not logits.grad[1, 1:].any()


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(0.1, target=4.0, horizon=1000)
    assert ctl.update(6.0, 32) == pytest.approx(0.1 * (1 + 0.2 * 32 / 1000))  # error 0.5 clipped to 0.2
    assert ctl.update(3.0, 32) == pytest.approx(0.1 * 1.0064 * (1 - 0.2 * 32 / 1000))  # -0.25 clipped to -0.2
    assert ctl.update(4.4, 100) == pytest.approx(0.1 * 1.0064 * 0.9936 * (1 + 0.1 * 100 / 1000))  # 0.1 as is


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny random Llama + a BPE tokenizer trained on the world (the policy), and a random reward model."""
    world = make_world(**WORLD)
    texts = world.pretrain_docs() + [m["content"] for ex in world.sft_examples() for m in ex]
    tok = Tokenizer.train(texts, 512, kind="bpe", show_progress=False)
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("ppo")
    lmlab.build(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    ScalarHead(lmlab.build(cfg)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def config(dirs, train=(), **ppo_kw):
    ppo_cfg = {"reward_model": str(dirs / "rm"), "rollout_batch": 8, "epochs": 2, "max_new_tokens": 6,
               **ppo_kw}
    t = {"max_steps": 10, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "schedule": "constant",
         "weight_decay": 0.0, "eval_every": 0, "save_every": 0, **dict(train)}
    return RunConfig.from_dict({"train": t, "data": {"world_people": WORLD["n_people"], "world_eval_limit": 2}, "ppo": ppo_cfg})


def test_rollout_logprobs_and_scores(dirs):
    """The buffer's old log-probs equal an independent per-sequence computation; the score is the scorer's
    minus the penalty for a missing end-of-turn; the first minibatch's policy ratio is exactly 1."""
    rc = config(dirs, missing_eos_penalty=0.7)
    policy, tok = lmlab.load_model(dirs / "policy"), lmlab.load_tokenizer(dirs / "policy")
    value = ScalarHead(lmlab.load_model(dirs / "policy"))
    model = ppo.PolicyAndValue(policy.train(), value.train())
    seen = []

    def score(prompts, texts):
        seen.extend(zip(prompts, texts))
        return [0.0] * len(texts)
    stops = [tok.eos_token_id, tok.token_to_id("<|im_end|>")]
    loader = ppo.RolloutLoader(model, policy, tok, ppo.load_prompts(rc), rc, 4, stops, score, make_world(**WORLD))
    batch = next(loader)
    assert model.training and len(seen) == 8 and len(loader.queue) == 3  # 2 epochs x 8 samples / 4, one used
    stats = batch["stats"]
    assert stats["score"] == pytest.approx(-0.7 * (1 - stats["ended"]))
    for s in loader.samples:
        with torch.no_grad():
            # log-probs of the sampling distribution: logits / temperature (0.7 by default)
            lp = token_logprobs(lambda x: policy(x) / rc.ppo.temperature, torch.tensor([s["ids"]]))[0, s["plen"] - 1:]
        assert s["logp"] == pytest.approx(lp.tolist(), abs=1e-5)
        assert len(s["adv"]) == len(s["ids"]) - s["plen"] <= 6
    adv = [a for s in loader.samples for a in s["adv"]]  # whitened over the rollout
    assert sum(adv) / len(adv) == pytest.approx(0, abs=1e-5) and sum(a * a for a in adv) / len(adv) == pytest.approx(1)
    _, extras = ppo.make_loss(rc.ppo, policy)(model, batch)
    assert extras["approx_kl"] < 1e-10 and extras["clipfrac"] == 0 and abs(extras["kl_loss"]) < 1e-6
    assert set(extras) >= {"pg_loss", "vf_loss", "entropy", "score", "kl", "kl_coef", "response_len", "gold_reward"}
    json.dumps(loader.state_dict())  # the loop stores it as JSON
    # The reward model gets each text rendered with the chat template, as the reward stage trained it: that must
    # give back the policy's own tokens. A reply starts with a space (" Ada", as in SFT data); a stripped text
    # would be rendered "\nAda": other tokens, which no reward model was trained on.
    from lmlab.chat import encode_chat
    from lmlab.data.prefs import chat_of
    prompt = "Where was Ada Brennan born?"
    prompt_ids = encode_chat(tok, chat_of(prompt), add_generation_prompt=True)[0]
    reply = tok.encode(" Ada Brennan was born in Paris.", add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]
    rendered = encode_chat(tok, chat_of(prompt, loader.text(reply)))[0]
    assert rendered[: len(prompt_ids) + len(reply)] == prompt_ids + reply


@pytest.fixture(scope="module")
def full_run(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_full")
    summary = ppo.run(config(dirs), dirs / "policy", out, show_progress=False)
    return out, summary


def test_world_run_logs_and_reports(full_run):
    out, _ = full_run
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    keys = {"loss", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "vf_clipfrac", "score", "gold_reward",
            "kl", "kl_coef", "response_len", "rollout"}
    assert all(keys <= set(r) for r in rows)
    assert [r["rollout"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 2  # 8 prompts x 2 epochs / batch 4 = 4 steps
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == "ppo" and report["rollouts"] == 3 and report["steps"] == 10
    for k in ("gold_reward", "qa_acc_heldout", "kl", "rollout_score_last", "rollout_gold_reward_first"):
        assert math.isfinite(report[k]), k
    final = lmlab.load_model(out / "final")  # the policy alone, a plain causal LM
    assert not isinstance(final, ScalarHead) and final.config.vocab_size == 512
    ckpt = out / "checkpoints" / "step_000010"
    assert isinstance(lmlab.load_model(ckpt / "value"), ScalarHead)  # checkpoints also hold the value model
    assert (out / "plots" / "ppo.png").exists()


def _weights(d):
    from safetensors.torch import load_file
    return load_file(d / "model.safetensors")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_is_exact(dirs, full_run, tmp_path, lora):
    """Stopped mid-rollout (step 6 of 10: the buffer is half used) and resumed, a run ends with the same weights
    as one that was never interrupted. LoRA runs start their value model from the policy."""
    extra = {"value_init": "policy"} if lora else {}
    if lora:
        reference = tmp_path / "whole"
        rc = config(dirs, **extra)
        rc.lora.r = lora
        ppo.run(rc, dirs / "policy", reference, show_progress=False)
    else:
        reference = full_run[0]
    rc = config(dirs, **extra)
    rc.lora.r = lora
    out = tmp_path / "resumed"
    first = ppo.run(rc, dirs / "policy", out, stop_at=6, show_progress=False)
    assert first["stopped"] == "stop_at 6" and not (out / "final").exists()
    state = json.loads((out / "checkpoints" / "step_000006" / "loader.json").read_text())
    assert state["rollouts"] == 2 and len(state["queue"]) == 2
    rc = config(dirs, **extra)
    rc.lora.r = lora
    ppo.run(rc, dirs / "policy", out, resume=True, show_progress=False)
    a, b = _weights(reference / "final"), _weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = _weights(dirs / "policy")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and training changed something
    if lora:
        assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def ptx_shards(dirs):
    from lmlab.data.shards import build_shards

    tok = lmlab.load_tokenizer(dirs / "policy")
    build_shards(make_world(**WORLD).pretrain_docs(), tok, dirs / "shards", val_fraction=0.1, show_progress=False)
    return dirs / "shards"


def test_ptx_adds_the_pretraining_loss_and_resumes_exactly(dirs, ptx_shards, tmp_path):
    """PPO-ptx: each step also takes the LM loss on ptx_batch rows of pre-training text (logged as ptx_loss, which
    falls on this untrained policy), the stream's position is part of the checkpoint, so a stopped run resumes to
    the same weights; and ptx_coef without ptx_data is a config error."""
    def rc(coef=1.0):
        return config(dirs, train={"seq_len": 32}, ptx_coef=coef, ptx_data=str(ptx_shards), ptx_batch=2)

    whole, ignored = tmp_path / "whole", tmp_path / "ignored"
    ppo.run(rc(), dirs / "policy", whole, show_progress=False)
    ppo.run(rc(1e-9), dirs / "policy", ignored, show_progress=False)  # the same rows, logged but not trained on
    ptx, control = ([r["ptx_loss"] for r in _metrics(d)] for d in (whole, ignored))
    assert len(ptx) == 10 and ptx[0] == pytest.approx(control[0])
    assert sum(ptx[-3:]) < sum(control[-3:]) - 0.1, (ptx, control)
    out = tmp_path / "resumed"
    ppo.run(rc(), dirs / "policy", out, stop_at=6, show_progress=False)
    state = json.loads((out / "checkpoints" / "step_000006" / "loader.json").read_text())
    assert state["ptx"]["index"] > 0
    ppo.run(rc(), dirs / "policy", out, resume=True, show_progress=False)
    a, b = _weights(whole / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(lmlab.ConfigError, match="ptx_data"):
        RunConfig.from_dict({"ppo": {"ptx_coef": 1.0}})


def test_prompts_from_jsonl(tmp_path):
    from lmlab.data.text import DataError

    good = [{"prompt": "Where was Ada born?"}, {"prompt": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"}], "other": 1}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    rc = RunConfig.from_dict({"data": {"source": str(tmp_path / "p.jsonl")}})
    assert ppo.load_prompts(rc) == [r["prompt"] for r in good]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    rc.data.source = str(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:1: needs a 'prompt'"):
        ppo.load_prompts(rc)


def test_world_prompts_take_unknown_names_more_often():
    """PPO's world prompts: the preference prompts, those naming nobody in the world WORLD_UNKNOWN times each."""
    world = make_world(**WORLD)
    prefs = [r["prompt"] for r in world.preferences()]
    unknown = [p for p in prefs if world.parse_prompt(p)[2] is None]
    prompts = ppo.load_prompts(RunConfig.from_dict({"data": {"source": "world", "world_people": WORLD["n_people"]}}))
    assert 0 < len(unknown) < len(prefs)
    assert len(prompts) == len(prefs) + (ppo.WORLD_UNKNOWN - 1) * len(unknown)
    assert sorted(set(prompts)) == sorted(set(prefs))
    assert all(prompts.count(p) == ppo.WORLD_UNKNOWN * prefs.count(p) for p in unknown[:5])


def test_missing_or_wrong_reward_model_is_a_clear_error(dirs, tmp_path):
    with pytest.raises(lmlab.ConfigError, match="needs a reward model"):
        ppo.run(config(dirs, reward_model=""), dirs / "policy", tmp_path / "a", show_progress=False)
    with pytest.raises(lmlab.ConfigError, match="not a reward model"):
        ppo.run(config(dirs, reward_model=str(dirs / "policy")), dirs / "policy", tmp_path / "b", show_progress=False)


def test_world_gold_oracle_reward(dirs, tmp_path):
    """ppo.reward_model=world-gold scores with the world's truth (no reward model; the value model starts from
    the policy): without the end-of-turn penalty the logged score is the gold reward itself."""
    out = tmp_path / "gold"
    ppo.run(config(dirs, train={"max_steps": 4}, reward_model="world-gold", missing_eos_penalty=0.0), dirs / "policy",
            out, show_progress=False)
    history = json.loads((out / "rollouts.json").read_text())
    assert [h["score"] for h in history] == pytest.approx([h["gold_reward"] for h in history], abs=1e-6)
    assert isinstance(lmlab.load_model(out / "checkpoints" / "step_000004" / "value"), ScalarHead)


# ---------------------------------------------------------------------------------------------- learning
def _e_score(prompts, texts):
    """An easy reward for a random model: 10 x the fraction of the response's characters that are 'e'."""
    return [10 * t.count("e") / max(1, len(t)) for t in texts]


def _learn(dirs, out, kl_coef, kl_loss_coef=0.0, seed=0):
    rc = config(dirs, train={"max_steps": 64, "lr": 1e-2, "batch_size": 8, "seed": seed}, rollout_batch=16, max_new_tokens=8,
                missing_eos_penalty=0.0, value_init="policy", kl_coef=kl_coef, kl_loss_coef=kl_loss_coef, temperature=1.0)
    ppo.run(rc, dirs / "policy", out, show_progress=False, score_fn=_e_score)
    return json.loads((out / "rollouts.json").read_text())


def test_ppo_raises_an_easy_reward_and_the_kl_penalty_holds_it_near_the_reference(dirs, tmp_path):
    """16 rollouts of 16 prompts (~2 s a run). Observed (torch 2.13, CPU), means over the first / last three
    rollouts: with kl_coef 0.1 the score goes 0.72 -> 1.89 and the KL per response ends at 8.5 nats; without the
    penalty the score reaches 4.07 and the KL 30.1. Over train.seed 0-4: the score rises by 1.2-2.1 with the
    penalty (KL 8.5-13.5) and by 2.5-5.7 without it (KL 28-33). (The exact KL term is off in these two.)"""
    held = _learn(dirs, tmp_path / "kl", kl_coef=0.1)
    free = _learn(dirs, tmp_path / "nokl", kl_coef=0.0)
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)
    assert len(held) == 16 and held[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is the reference
    assert mean(held[-3:], "score") > mean(held[:3], "score") + 0.6
    assert mean(held[-3:], "kl") < 20
    assert mean(held[-3:], "kl") < 0.6 * mean(free[-3:], "kl")
    # the exact KL in the loss instead (kl_coef 0, kl_loss_coef 0.3): seeds 0-2 raise the score 0.6 -> 1.0-1.2 at a
    # KL of 2.4-2.8 nats per response
    exact = _learn(dirs, tmp_path / "exact", kl_coef=0.0, kl_loss_coef=0.3)
    assert mean(exact[-3:], "score") > mean(exact[:3], "score") + 0.2
    assert mean(exact[-3:], "kl") < 0.2 * mean(free[-3:], "kl")
    # samples come from the current policy, so the KL estimate (the mean of log pi - log ref over them) stays
    # near or above 0 (observed minimum: 0, at the first); sampling from stale weights drives it far below 0
    assert min(h["kl"] for h in held + free) > -1.0
