"""LoRA as a module swap: apply, merge, unmerge, and adapters in the layout the `peft` library reads.

A LoRALinear keeps the frozen base nn.Linear and adds a low-rank update:
    y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r        A: (r, in), B: (out, r), B starts at zero
so a freshly applied adapter leaves the model's outputs unchanged. Adapters are saved as
adapter_config.json + adapter_model.safetensors with PEFT's names
(base_model.model.<HF module path>.lora_A.weight), through the same tensor-name maps as checkpoints.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write, write_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: B = 0, so the update starts at zero
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta().to(self.base_layer.weight.dtype)
            self.merged = False


def _matches(name: str, targets) -> bool:
    """A module is targeted when its last name part is in `targets`, or a target regex matches its name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.rsplit(".", 1)[-1] in targets


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS):
    """Swap every targeted nn.Linear for a LoRALinear and freeze everything else; returns the model."""
    if r <= 0:
        raise ConfigError(f"lora rank must be positive, got {r}")
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and _matches(name, targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(module, r, alpha, dropout))
            swapped.append(name)
    if not swapped:
        raise ConfigError(f"no linear layer matches the LoRA targets {targets!r}")
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted({n.rsplit(".", 1)[-1] for n in swapped})}
    return model


def lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (a plain model again)."""
    for name, module in lora_layers(model).items():
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    for p in model.parameters():
        p.requires_grad = True
    model.__dict__.pop("lora_config", None)
    return model


def _peft_prefix(model, name: str) -> tuple[str, torch.Tensor | None]:
    """lmlab module path -> PEFT's key prefix, through the model family's HF tensor-name map, and the stored row
    order of a weight whose rows are reordered as a whole (Cohere's q/k: lora_B's rows follow), else None."""
    from lmlab.interop.hf import Rows, _template, tensor_map

    key, i = _template(name + ".weight")
    spec = tensor_map(model.config).get(key)
    if isinstance(spec, Rows) and spec.index.numel() == spec.rows:
        return "base_model.model." + spec.name.format(i=i).removesuffix(".weight"), spec.index
    if not isinstance(spec, str):
        raise ConfigError(f"{name}: LoRA on this layer has no PEFT equivalent for {model.config.model_type} "
                          f"(it is stored fused or transposed)")
    return "base_model.model." + spec.format(i=i).removesuffix(".weight"), None


def save_adapter(model, out_dir, base_model_name_or_path: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_layers(model).items():
        prefix, rows = _peft_prefix(model, name)
        B = m.lora_B.detach().cpu()  # (out, r)
        if rows is not None:
            B = torch.empty_like(B).index_copy_(0, rows, B)  # stored row rows[j] is lmlab's row j
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, **model.lora_config}
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", cfg)


def load_adapter(model, adapter_dir):
    """Apply the adapter of a PEFT directory (ours or peft's) to `model`, or load its values into the adapters
    `model` already has; returns the model."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{d / 'adapter_config.json'}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg["target_modules"]
    if not lora_layers(model):  # a model that already has adapters (resuming a LoRA run) gets new values only
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                   targets if isinstance(targets, str) else tuple(targets))
    tensors = load_file(d / "adapter_model.safetensors")
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            prefix, rows = _peft_prefix(model, name)
            for part in ("lora_A", "lora_B"):
                key = f"{prefix}.{part}.weight"
                if key not in tensors:
                    raise ConfigError(f"{d / 'adapter_model.safetensors'}: tensor {key!r} is missing")
                t = tensors[key]
                getattr(m, part).copy_(t[rows] if part == "lora_B" and rows is not None else t)
    return model
