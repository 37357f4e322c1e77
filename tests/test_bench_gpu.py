"""bench/gpu.py is the one script a session lent a GPU runs, with a few minutes of device time: it must work the
first time. On a CPU (`--device cpu`, the tiny preset) it runs the same code paths except the flash-kernel check,
and its comparisons hold: lmlab and transformers agree on fp32 logits, on the first training loss (eager and
compiled; bf16 where the CPU has it natively) and on greedy decoding."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts bench/ on sys.path for its own imports
    mod.common.RESULTS = tmp_path_factory.mktemp("results")  # not the repository's bench/results
    return mod


def test_gpu_script_on_a_cpu(gpu):
    from lmlab.train.dist import fast_bf16

    dtype = "bfloat16" if fast_bf16("cpu") else "float32"  # emulated bf16 would take minutes
    res = gpu.run(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "1",
                   "--warmup", "1", "--new-tokens", "6", "--dtype", dtype, "--no-docs"])
    assert res["failures"] == [], res["failures"]
    assert res["parity_max_abs"] < 1e-4
    assert [d["batch"] for d in res["decode"]] == [1, 16] and all(d["same_ids"] for d in res["decode"])
    train = res["train"]
    assert set(train) == {"lmlab", "lmlab_compiled", "transformers"}
    losses = [t["first_loss"] for t in train.values()]
    assert max(losses) - min(losses) < 2e-2 and 5 < losses[0] < 10  # ~ln(vocab) for random weights
    assert all(t["tokens_per_s"] > 0 and 0 < t["mfu_6n"] < t["mfu_with_attention"] for t in train.values())
    assert (Path(gpu.common.RESULTS) / "gpu.json").exists()


def test_gpu_script_without_a_gpu_says_so(gpu):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.run(["--no-docs"])
