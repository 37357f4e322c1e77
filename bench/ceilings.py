"""The machine's ceilings, measured first by `make bench`: what every other table's MFU and bandwidth share
are relative to. Peak matmul FLOP/s in fp32 and bf16 (best of 5 square GEMMs of 2048 and 4096) and memory
copy bandwidth (256 MB fp32 `dst.copy_(src)`, bytes read + written per second).

    python bench/ceilings.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    args = common.parser(__doc__).parse_args()
    common.setup(args.threads)
    info = common.machine_info()
    sizes = {torch.float32: (2048, 4096), torch.bfloat16: (2048, 4096) if info["native_bf16"] else (512,)}
    peaks = {str(dt).replace("torch.", ""): max(common.matmul_peak_gflops(dt, n) for n in ns) for dt, ns in sizes.items()}
    bw = common.copy_bandwidth_gbs()
    rows = [[f"matmul peak, {k}", f"{v:,.0f} GFLOP/s"] for k, v in peaks.items()] + \
        [["memory copy bandwidth (read + write)", f"{bw:.1f} GB/s"]]
    table = common.md_table(["ceiling", "measured"], rows)
    print(table)
    body = "\n\n".join(["## Machine ceilings",
                        f"`python bench/ceilings.py`, {args.threads} threads: peak matmul FLOP/s (best of 5 square GEMMs "
                        "of 2048 and 4096; of 512 for bf16 on a CPU without native bf16, whose scalar fallback is slow) "
                        "and memory copy bandwidth (256 MB fp32 `dst.copy_(src)`, bytes read + written per second), "
                        "what the other tables' MFU and bandwidth shares are relative to (each benchmark also measures "
                        "its own, in the same run).", table, common.machine_line(info)])
    common.publish("ceilings", {"machine": info, "matmul_peak_gflops": peaks, "copy_bandwidth_gbs": bw}, body,
                   docs=not args.no_docs)


if __name__ == "__main__":
    main()
