"""Mixture of Experts forward: lmlab vs transformers (Mixtral) on the same weights, in one process.

A Mixtral-style model (8 experts, top-2 routing, hidden 512, expert width 1408, 4 layers, 32k vocabulary):
the MoE layer alone (router + experts on 512 tokens) and the whole model's forward on 1 x 512 tokens, fp32,
inference mode, best of --repeats after a warm-up call, the two sides interleaved. Outputs are compared.
lmlab dispatches tokens by sorting their (token, expert) assignments by expert: one matmul per expert
over a contiguous slice.

    python bench/moe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402

TARGET = 2.0
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    common.setup(args.threads)
    model, hf = common.model_pair("mixtral-tiny", **SHAPE)
    model.eval()
    hf.eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, args.tokens, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(1))
    ours_layer, hf_layer = model.layers[0].mlp, hf.model.layers[0].mlp

    def hf_layer_fn():
        out = hf_layer(x)
        return out[0] if isinstance(out, tuple) else out

    with torch.inference_mode():
        layer_diff = float((ours_layer(x) - hf_layer_fn()).abs().max())
        model_diff = float((model(ids) - hf(input_ids=ids, use_cache=False).logits).abs().max())
        t, _ = common.best_interleaved({"layer_lmlab": lambda: ours_layer(x), "layer_hf": hf_layer_fn,
                              "model_lmlab": lambda: model(ids),
                              "model_hf": lambda: hf(input_ids=ids, use_cache=False)}, args.repeats)
    n = args.tokens
    rows = [[f"MoE layer forward ({n} tokens), tokens/s", n / t["layer_lmlab"], n / t["layer_hf"],
             t["layer_hf"] / t["layer_lmlab"], "", f"{layer_diff:.1e}"],
            [f"model forward (1 x {n}), tokens/s", n / t["model_lmlab"], n / t["model_hf"],
             t["model_hf"] / t["model_lmlab"],
             f">= {TARGET:g}x: {'met' if t['model_hf'] / t['model_lmlab'] >= TARGET else 'NOT met'}",
             f"{model_diff:.1e}"]]
    table = common.md_table(["case", "lmlab", "transformers", "lmlab / transformers", "target",
                             "max abs difference"], rows)
    print(table)
    info = common.machine_info()
    body = "\n\n".join([
        "## Mixture of Experts forward: Mixtral-style, 8 experts, top-2, fp32",
        f"`python bench/moe.py`: {model.num_params() / 1e6:.0f}M parameters (hidden 512, expert width 1408, 4 layers), "
        f"random weights handed to transformers through save_pretrained; inference mode, best of {args.repeats} "
        "interleaved calls after a warm-up; the layer is the first block's MoE (router + experts).",
        table, common.machine_line(info)])
    common.publish("moe", {"machine": info, "seconds": t, "layer_max_abs_diff": layer_diff,
                           "model_max_abs_diff": model_diff, "args": vars(args)}, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
