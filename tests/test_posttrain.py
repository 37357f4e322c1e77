"""Post-training pieces: SFT masks and packing, data formats and their errors, the resumable list loader,
the reward model (Bradley-Terry, transformers parity of the saved classifier), DPO/IPO losses against
hand-computed values, and each stage end to end on a tiny model (LoRA and full, exact resume)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.config import ConfigError, DPOConfig, RunConfig
from lmlab.data.prefs import encode_pair, load_rankings, split_rankings, to_pairs
from lmlab.data.sft import encode_conversations, load_conversations, make_rows, to_messages
from lmlab.data.text import DataError
from lmlab.data.world import make_world
from lmlab.models.heads import ScalarHead
from lmlab.tokenizer import Tokenizer
from lmlab.train.dpo import dpo_loss
from lmlab.train.posttrain import IGNORE, ListLoader, pad_right, token_logprobs
from lmlab.train.reward import bradley_terry_loss

WORLD = {"seed": 3, "n_people": 20}


@pytest.fixture(scope="module")
def tok():
    w = make_world(**WORLD)
    texts = w.pretrain_docs() + [m["content"] for ex in w.sft_examples() for m in ex]
    return Tokenizer.train(texts, 512, kind="bpe", show_progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    """A tiny random Llama + tokenizer, with the lmlab.json of a world run (seed 3, 20 people)."""
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("base")
    lmlab.build(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    rc = RunConfig.from_dict({"data": {"world_seed": WORLD["seed"], "world_people": WORLD["n_people"]}})
    (d / "lmlab.json").write_text(json.dumps({"stage": "pretrain", "config": rc.to_dict()}))
    return d


# ------------------------------------------------------------------------------------------------ SFT data
def test_sft_labels_cover_exactly_the_assistant_replies(tok):
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada born?"},
              {"role": "assistant", "content": "Ada was born in Paris."}, {"role": "user", "content": "And?"},
              {"role": "assistant", "content": "That is all."}]]
    (ids, mask), = encode_conversations(tok, convs)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Ada was born in Paris.<|im_end|>That is all.<|im_end|>"
    (x, y), = make_rows([(ids, mask)], seq_len=len(ids) + 5, pad_id=tok.pad_token_id, packing=False)
    assert len(x) == len(y) == len(ids) + 5
    assert [t for t in y if t != IGNORE] == [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert x[:len(ids)] == ids and set(x[len(ids):]) == {tok.pad_token_id}


def test_packing_keeps_every_conversation_and_its_labels(tok):
    convs = load_conversations("world", **{"world_seed": 3, "world_people": 20})[:40]
    examples = encode_conversations(tok, convs)
    rows = make_rows(examples, seq_len=128, pad_id=tok.pad_token_id, packing=True, seed=1)
    unpacked = make_rows(examples, seq_len=128, pad_id=tok.pad_token_id, packing=False)
    assert len(rows) < len(examples) == len(unpacked)
    n_labels = lambda rs: sum(sum(t != IGNORE for t in y) for _, y in rs)  # noqa: E731
    assert n_labels(rows) == n_labels(unpacked) == sum(sum(m[1:]) for _, m in examples)
    real = sum(sum(t != tok.pad_token_id for t in x) for x, _ in rows)
    assert real >= sum(len(ids) for ids, _ in examples) - len(rows)  # only the last token of a row is cut


def test_alpaca_and_chat_records(tmp_path):
    assert to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}) == [
        {"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                 "content": "hello"}]}) + "\n"
                    + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: expected 'messages'"):
        load_conversations(str(path))
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*no assistant message"):
        load_conversations(str(path))


# ------------------------------------------------------------------------------------------------- loader
def test_list_loader_resumes_exactly_and_splits_ranks():
    items = list(range(10))
    a = ListLoader(items, 3, list, seed=5)
    first = [next(a) for _ in range(4)]
    state = a.state_dict()
    rest = [next(a) for _ in range(5)]
    b = ListLoader(items, 3, list, seed=5)
    b.load_state_dict(state)
    assert [next(b) for _ in range(5)] == rest
    seen = [i for batch in first[:3] for i in batch] + first[3][:1]
    assert sorted(seen) == items  # one epoch is a permutation
    ranks = [ListLoader(items, 2, list, seed=5, rank=r, world=2) for r in range(2)]
    glob = ListLoader(items, 4, list, seed=5)
    for _ in range(6):
        assert next(ranks[0]) + next(ranks[1]) == next(glob)


# ------------------------------------------------------------------------------------------ reward model
def test_bradley_terry_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = 0.313262, -log sigmoid(-1) = 1.313262; mean 0.813262
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(0.813262, abs=1e-6)
    # margin 0.5 on the first pair: -log sigmoid(0.5) = 0.474077
    assert bradley_terry_loss(r_c, r_r, torch.tensor([0.5, 0.0])).item() == pytest.approx((0.474077 + 1.313262) / 2,
                                                                                           abs=1e-6)


def test_rankings_give_all_pairs_with_rank_margins(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "responses": ["a", "b", "c", "d"]}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": "x", "rejected": "y",
                                  "margin": 2.0}) + "\n")
    pairs = to_pairs(load_rankings(str(path)), margin=0.5)
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("a", "b", 0.5), ("a", "c", 1.0), ("a", "d", 1.5), ("b", "c", 0.5), ("b", "d", 1.0), ("c", "d", 0.5),
        ("x", "y", 2.0)]
    path.write_text(json.dumps({"prompt": "q", "responses": ["only one"]}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:1: a ranking needs at least two"):
        load_rankings(str(path))


def test_world_preference_split_is_by_prompt():
    rankings = load_rankings("world", **{"world_seed": 3, "world_people": 20})
    train, val = split_rankings(rankings, 0.2, seed=0)
    assert len(train) + len(val) == len(rankings) and abs(len(val) - 0.2 * len(rankings)) < 0.05 * len(rankings)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


@pytest.mark.parametrize("preset", ["tiny", "gpt2-tiny", "mixtral-tiny"])
def test_reward_model_matches_transformers_classifier(preset, tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              pad_token_id=tok.pad_token_id)
    rm = ScalarHead(lmlab.build(lmlab.preset(preset, **kw))).eval()
    rm.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    from lmlab.data.prefs import encode_ranking
    from lmlab.train.reward import collate_rankings
    rankings = [encode_ranking(tok, r) for r in load_rankings("world", 3, 20)[:3]]
    seqs = [ids for r in rankings for ids, _ in r["responses"]]
    ids, mask = pad_right(seqs, tok.pad_token_id), pad_right([[1] * len(s) for s in seqs], 0)
    assert not bool(mask.all())  # a padded batch
    packed = collate_rankings(tok.pad_token_id)(rankings)[0]  # how lmlab reward trains and evaluates
    with torch.no_grad():
        ours = rm.reward(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        again = lmlab.load_model(tmp_path).reward(ids, mask)
        from_packed = packed.last(packed.run(rm))
    assert (ours - theirs).abs().max() < 1e-4
    assert (from_packed - theirs).abs().max() < 1e-4
    assert torch.equal(ours, again)


# -------------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("window", [None, 12])
def test_packed_sequences_compute_each_sequence_alone(tok, window):
    """pack_sequences stores a ranking's (a DPO pair's) shared prompt once and several groups in one row; the
    rewards, gradients and DPO log-probs read from the packed rows are those of each sequence run alone
    (fp32, unpadded); with a sliding window (Mistral) too, applied to each sequence's own positions."""
    from lmlab.data.prefs import encode_ranking
    from lmlab.train.dpo import collate, sequence_logprobs
    from lmlab.train.posttrain import pack_sequences
    from lmlab.train.reward import collate_rankings, pair_rewards

    rankings = [encode_ranking(tok, r) for r in load_rankings("world", 3, 20)[:6]]
    seqs = [ids for r in rankings for ids, _ in r["responses"]]
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, sliding_window=window, **({"model_type": "mistral"} if window else {}))
    rm = ScalarHead(lmlab.build(cfg))
    packed, better, worse, margins = collate_rankings(tok.pad_token_id, row_len=128)(rankings)
    assert packed.ids.shape[0] < len(seqs)
    assert max(map(len, seqs)) > 12  # sequences longer than the window
    r_c, r_r = pair_rewards(rm, (packed, better, worse, margins))
    alone = torch.cat([rm.reward(torch.tensor([s])) for s in seqs])
    torch.testing.assert_close(torch.stack([r_c, r_r]), torch.stack([alone[better], alone[worse]]), rtol=0, atol=1e-5)
    (g_packed,) = torch.autograd.grad((r_c - r_r).sum(), rm.backbone.layers[0].attn.q_proj.weight)
    (g_alone,) = torch.autograd.grad((alone[better] - alone[worse]).sum(), rm.backbone.layers[0].attn.q_proj.weight)
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-5)
    # several groups share a row, and a ranking's prompt is stored once: fewer real tokens than the sequences hold
    stored = int((packed.ids != tok.pad_token_id).sum())
    assert stored < sum(map(len, seqs)) and (packed.lengths == torch.tensor(list(map(len, seqs)))).all()

    lm = lmlab.build(cfg)
    items = [encode_pair(tok, p) for p in to_pairs(load_rankings("world", 3, 20)[:4])]
    packed, resp = collate(tok.pad_token_id, row_len=64)(items)
    with torch.no_grad():
        lp = sequence_logprobs(lm, packed, resp)
        rows = [it[k] for it in items for k in ("chosen", "rejected")]
        want = torch.stack([(token_logprobs(lm, torch.tensor([ids]))[0] * torch.tensor(m[1:]).float()).sum()
                            for ids, m in rows])
        torch.testing.assert_close(lp, want, rtol=1e-6, atol=1e-4)  # sums of ~900 nats (a random model)
        # a 4-D mask needs the positions of each token in its sequence
        with pytest.raises(ValueError, match="position_ids"):
            lm(packed.ids, packed.mask)
    assert pack_sequences([[[5, 6, 7], [5, 6, 8, 9]]], 4, 0).ids.tolist() == [[5, 6, 7, 8, 9]]


def test_dpo_and_ipo_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-4.0, -6.0, -5.0, -5.0))
    # h = beta * ((pc - rc) - (pr - rr)) = 0.1 * (1 - (-1)) = 0.2; loss = -log sigmoid(0.2) = 0.598139
    loss, m = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=0.1))
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert m["reward_chosen"] == pytest.approx(0.1) and m["reward_rejected"] == pytest.approx(-0.1)
    assert m["reward_accuracy"] == 1.0
    # label smoothing 0.1: 0.9 * 0.598139 + 0.1 * -log sigmoid(-0.2) (= 0.798139) = 0.618139
    loss, _ = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=0.1, label_smoothing=0.1))
    assert loss.item() == pytest.approx(0.618139, abs=1e-6)
    # IPO on per-token means, 2 tokens each: h/beta = (-2 + 2.5) - (-3 + 2.5) = 1; (1 - 1/(2*0.1))^2 = 16
    loss, _ = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=0.1, loss="ipo"), torch.tensor([2.0]), torch.tensor([2.0]))
    assert loss.item() == pytest.approx(16.0, abs=1e-5)
    assert math.isclose(dpo_loss(pc, pc, rc, rc, DPOConfig())[0].item(), math.log(2), rel_tol=1e-6)


# ------------------------------------------------------------------------------------- stages end to end
def _logits(model_dir, ids):
    with torch.no_grad():
        return lmlab.load_model(model_dir)(ids)


def test_sft_lora_run_writes_adapter_and_merged_model(base_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    assert main(["sft", "--model", str(base_dir), "--out", str(out), "--lora-rank", "4", "--lora-targets", "q_proj",
                 "v_proj", "--set", "train.max_steps=4", "train.batch_size=4", "train.seq_len=128", "train.lr=1e-2",
                 "data.world_eval_limit=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["stage"] == "sft" and {"qa_acc_seen", "qa_acc_heldout", "idk_rate", "gold_reward"} <= set(report)
    assert json.loads((out / "report.json").read_text()) == report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    merged, base = _logits(out / "final", ids), _logits(base_dir, ids)
    assert (merged - base).abs().max() > 1e-3  # training changed the model ...
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    with torch.no_grad():
        assert (hf(ids).logits - merged).abs().max() < 1e-4  # ... and final/ is base + the saved adapter
    assert lmlab.load_tokenizer(out / "final").encode("Hello") == lmlab.load_tokenizer(base_dir).encode("Hello")


def test_sft_resumes_exactly(base_dir, tmp_path):
    from lmlab.train import sft

    def rc():
        return RunConfig.from_dict({"train": sft.DEFAULTS["train"] | {"max_steps": 6, "batch_size": 4, "seq_len": 128,
                                                                      "save_every": 0, "lr": 3e-3},
                                    "data": {"world_seed": 3, "world_people": 20, "world_eval_limit": 1}})
    sft.run(rc(), base_dir, tmp_path / "full")
    assert sft.run(rc(), base_dir, tmp_path / "cut", stop_at=3)["stopped"] == "stop_at 3"
    sft.run(rc(), base_dir, tmp_path / "cut", resume=True)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    assert torch.equal(_logits(tmp_path / "full" / "final", ids), _logits(tmp_path / "cut" / "final", ids))


def test_finetune_on_text_full(base_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("The lighthouse keeper counts ships every night. " * 200)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(base_dir), "--data", str(text), "--out", str(out), "--set",
                 "train.max_steps=6", "train.batch_size=4", "train.seq_len=64", "train.lr=3e-3",
                 "train.eval_every=0", "data.val_fraction=0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["trainable_params"] == lmlab.load_model(base_dir).num_params()
    rows = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] < rows[0] - 0.5  # a repeated sentence is quickly learned
    assert not (out / "adapter").exists()


def test_reward_stage_and_eval(base_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["reward", "--model", str(base_dir), "--out", str(out), "--set", "train.max_steps=3",
                 "train.batch_size=4", "train.eval_every=0"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["val_pairs"] > 0 and 0 <= report["pair_acc"] <= 1
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert main(["eval", "--model", str(out / "final"), "--task", "reward"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pair_acc"] == pytest.approx(report["pair_acc"]) and result["pairs"] == report["val_pairs"]


def test_dpo_stage_learns_its_pairs(base_dir, tmp_path, tok):
    from lmlab.train import dpo

    pairs = to_pairs(load_rankings("world", 3, 20)[:3])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs))
    rc = RunConfig.from_dict({"train": dpo.DEFAULTS["train"] | {"max_steps": 20, "batch_size": 4, "lr": 1e-3,
                                                                "warmup_steps": 0},
                              "data": {"source": str(data), "val_fraction": 0.0}})
    dpo.run(rc, base_dir, tmp_path / "dpo")
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    items = [encode_pair(tok, p) for p in pairs]
    after = dpo.evaluate(lmlab.load_model(tmp_path / "dpo" / "final"), lmlab.load_model(base_dir), items,
                         tok.pad_token_id, rc.dpo)
    # chosen responses gained log-probability relative to rejected ones (observed: loss 0.69 -> 0.49,
    # margin 0.72, 7 of 9 pairs ordered after 20 steps on a random tiny model)
    assert after["val_reward_margin"] > 0.3 and after["val_loss"] < 0.6 and after["val_reward_accuracy"] > 0.6, after


def test_dpo_evaluates_eval_batches_of_pairs_spread_over_the_split(base_dir, tmp_path):
    from lmlab.train import dpo

    assert dpo.spread(list(range(10)), 4) == [0, 2, 5, 7] and dpo.spread([1, 2], 4) == [1, 2]
    assert dpo.spread(list(range(10)), 0) == list(range(10))  # 0 = all
    with pytest.raises(ConfigError, match=r"eval_batches must be >= 0 \(0 = all\)"):
        RunConfig.from_dict({"train": {"eval_batches": -1}})
    pairs = to_pairs(load_rankings("world", 3, 20)[:40])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs))
    rc = RunConfig.from_dict({"train": dpo.DEFAULTS["train"] | {"max_steps": 1, "batch_size": 2, "eval_batches": 1},
                              "data": {"source": str(data), "val_fraction": 0.5}})
    dpo.run(rc, base_dir, tmp_path / "dpo")
    report = json.loads((tmp_path / "dpo" / "report.json").read_text())
    assert report["val_pairs"] == dpo.EVAL_BATCH < len(pairs) // 3, (report, len(pairs))


def test_lora_on_layers_peft_cannot_hold_fails_at_the_start(tmp_path, tok):
    """GPT-2 keeps q/k/v fused and Conv1D weights transposed: PEFT's layout has no place for such adapters, so a
    LoRA run says so before training instead of failing at its first checkpoint."""
    from lmlab.config import ConfigError
    from lmlab.train.posttrain import load_trainable

    lmlab.build(lmlab.preset("gpt2-tiny", vocab_size=tok.vocab_size)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.q_proj: LoRA on this layer has no PEFT equivalent"):
        load_trainable(tmp_path, RunConfig.from_dict({"lora": {"r": 4}}))
    model, _ = load_trainable(tmp_path, RunConfig.from_dict({"lora": {"r": 0}}))  # full fine-tuning works
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_two_processes_match_one(stage, base_dir, tmp_path):
    """`lmlab reward` and `lmlab dpo` under torchrun (2 gloo processes, DDP) give the single-process loss curve:
    the packed forward goes through the wrapped model's forward. Plain pairs, so each rank's half of a batch holds
    as many pairs as the other and the mean of the two ranks' means is the batch's mean."""
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for p in to_pairs(load_rankings("world", 3, 20))[:48]:
            f.write(json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n")
    args = [stage, "--model", str(base_dir), "--data", str(pairs), "--set", "train.max_steps=4", "train.batch_size=8",
            "train.eval_every=0", "train.lr=1e-3", "train.warmup_steps=0", "data.val_fraction=0.1"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lmlab", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    curves = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("one", "two")]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == [1, 2, 3, 4]
    assert curves[0][0][1] != curves[0][-1][1]  # it trained
    for (s, a), (_, b) in zip(*curves):
        assert abs(a - b) <= 1e-5, (s, a, b)
