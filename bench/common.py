"""Shared helpers for the benchmark scripts: machine ceilings, the model pair, tables and result files.

The scripts run as `python bench/<name>.py` from the repository root, so this module is imported as
`common` (the script's own directory is first on sys.path).
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEADER = ("# Benchmarks\n\nNumbers come from `make bench` on the machine named in each table; ratios are "
              "lmlab / peer (transformers) measured in the same run.\n")


def setup(threads: int, seed: int = 0):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    from lmlab.train.dist import fast_bf16
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": fast_bf16("cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def skip_without_native_bf16(what: str) -> None:
    """Exit 0 with a note where this CPU has no native bf16 matmul: there PyTorch's bf16 products are scalar code
    (~1 GFLOP/s), so a bf16 case would time that fallback, not lmlab; the tables stay as measured elsewhere."""
    from lmlab.train.dist import fast_bf16
    if not fast_bf16("cpu"):
        print(f"{what}: skipped, this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matrix "
              "instructions (AVX-512 or AMX); docs/benchmarks.md keeps the tables measured on one that has")
        raise SystemExit(0)


def best_time(fn, reps: int) -> float:
    """Best wall time of `reps` calls of fn() (seconds), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """One untimed round, then `repeats` rounds that call every fn once in turn, so that the machine's slow
    spells hit every side alike -> ({name: best seconds}, {name: output of its last call})."""
    best, out = {k: float("inf") for k in fns}, {}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            if r:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def median(xs) -> float:
    return statistics.median(xs)


def sync(device) -> None:
    """Wait for the device's queued kernels (a GPU's run asynchronously), so that a clock read after it is fair."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(dtype=torch.float32, n: int = 2048, reps: int = 5, device="cpu") -> float:
    """Best-of-reps GFLOP/s of an n x n x n matmul (2 n^3 flops) on `device`."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))

    def mm():
        a @ b
        sync(device)
    return 2 * n**3 / best_time(mm, reps) / 1e9


def copy_bandwidth_gbs(mbytes: int = 256, reps: int = 5) -> float:
    """Memory bandwidth of dst.copy_(src) on an fp32 tensor of `mbytes` MB, counted as bytes read +
    bytes written per second (2 x size per copy), in GB/s (1e9 bytes)."""
    numel = mbytes * 2**20 // 4
    src, dst = torch.randn(numel), torch.empty(numel)
    return 2 * numel * 4 / best_time(lambda: dst.copy_(src), reps) / 1e9


def model_pair(preset: str = "llama-50m", **overrides):
    """The same random weights as an lmlab model and as a transformers model (fp32, SDPA attention),
    handed over through lmlab's save_pretrained and transformers' from_pretrained."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import lmlab

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)  # the same weights whatever ran before
    model = lmlab.build(lmlab.preset(preset, **overrides))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    return model, hf


def weight_counts(model) -> dict:
    """Parameter counts of an lmlab model: all, and all but the input embedding table (the head and
    every matrix a token's forward pass multiplies with). A tied head is the embedding matrix, counted
    once in `params` but multiplied with like any untied head, so it stays in; learned position tables
    (GPT-2) are lookups and go."""
    total = model.num_params()
    lookup = 0 if model.config.tie_word_embeddings else model.embed.weight.numel()
    if model.pos_embed is not None:
        lookup += model.pos_embed.weight.numel()
    return {"params": total, "params_no_embed": total - lookup}


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    isa = f" ({info['isa']}, {'native' if info['native_bf16'] else 'no native'} bf16)" if "isa" in info else ""
    return (f"Machine: {info['cpu']}{isa}, {info['threads']} threads, torch {info['torch']}, "
            f"transformers {info['transformers']}, {info['date']}.")


def write_section(name: str, body: str, path: Path = DOC):
    """Replace (or append) the section of docs/benchmarks.md between <!-- bench:name --> and
    <!-- /bench:name -->, leaving the rest of the file as it is."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save_json(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def publish(name: str, result: dict, body: str, docs: bool = True) -> None:
    """Write the JSON result and (unless docs is False) the docs/benchmarks.md section."""
    print(f"\nwrote {save_json(name, result)}")
    if docs:
        write_section(name, body)
        print(f"updated {DOC}")


def parser(doc: str):
    """The scripts' argument parser, with the options they all share (--threads, --no-docs)."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    return ap
