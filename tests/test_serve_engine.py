"""The continuous-batching engine on its own: requests of different lengths that arrive while others run,
prefilled in groups, sharing a KV cache that must be compacted, each decode exactly as it would alone."""
import threading

import pytest
import torch
from conftest import spread_weights

import lmlab
from lmlab.inference.sampling import SamplingParams
from lmlab.serve.engine import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return spread_weights(lmlab.build(cfg)).eval()


def stopped_engine(model, **kw):
    """An Engine whose thread is stopped: the test takes its steps (`drive`), so what runs together is fixed."""
    engine = Engine(model, **kw)
    engine.shutdown()
    return engine


def drive(engine, steps=10**6):
    """What the engine's loop does: admit waiting requests, then one decode step for all that run."""
    for _ in range(steps):
        if not engine.running and engine.waiting.empty():
            return
        engine._admit()
        if engine.running:
            engine._step()


def run(engine, prompt, n):
    """Submit one greedy request; returns (tokens list filled as they come, finished event, reasons)."""
    out, done, reasons = [], threading.Event(), []

    def on_token(tok, reason):
        if tok is not None:
            out.append(tok)
        else:
            reasons.append(reason)
            done.set()
    engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[]), on_token)
    return out, done, reasons


def test_staggered_requests_decode_as_alone_through_grouped_prefill_and_compaction(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (12,), generator=g)]
    lengths = [int(n) for n in torch.randint(4, 24, (12,), generator=g)]
    expected = [lmlab.generate(model, p, max_new_tokens=n, temperature=0.0, stop_token_ids=[])
                for p, n in zip(prompts, lengths)]
    engine = stopped_engine(model, max_batch=4, max_len=48)  # small: the shared timeline fills and is compacted
    groups = []
    real = engine._prefill
    engine._prefill = lambda reqs: (groups.append(len(reqs)), real(reqs))[1]
    first = [run(engine, p, n) for p, n in zip(prompts[:6], lengths[:6])]  # 6 at once into 4 rows
    drive(engine, 5)
    rest = [run(engine, p, n) for p, n in zip(prompts[6:], lengths[6:])]  # arrive mid-decode
    drive(engine)
    for k, (out, done, reasons) in enumerate(first + rest):
        assert done.is_set() and reasons == ["length"], k
        assert out == expected[k], k
    assert max(groups) > 1  # prompts were prefilled together
    assert engine.compactions > 0


def test_a_failing_prefill_fails_only_its_own_request(model):
    engine = stopped_engine(model, max_batch=4, max_len=48)
    real = engine._prefill
    calls = []

    def boom(reqs):
        calls.append(len(reqs))
        if any(len(r.prompt) == 7 for r in reqs):
            raise RuntimeError("injected")
        return real(reqs)
    engine._prefill = boom
    jobs = [run(engine, list(range(1, n + 1)), 5) for n in (3, 7, 5)]
    drive(engine)
    assert calls == [3, 1, 1, 1]  # the group, then each alone
    assert [j[2] for j in jobs] == [["length"], ["error: RuntimeError: injected"], ["length"]]
    assert [j[0] for j in jobs] == [lmlab.generate(model, list(range(1, n + 1)), max_new_tokens=5, temperature=0.0,
                                                   stop_token_ids=[]) if n != 7 else [] for n in (3, 7, 5)]
