"""LoRA as a module swap, against the peft library: adapters load both ways with the same logits."""
import pytest
import torch
import transformers

import lmlab
from lmlab.models.lora import LoRALinear, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter

peft = pytest.importorskip("peft", reason="the peft library (test extra) is the reference for the adapter layout")


def randomize_lora(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)


def test_fresh_adapter_changes_nothing_and_freezes_the_base(hf_dirs):
    model = lmlab.load_model(hf_dirs("llama-gqa-untied"))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, r=4, alpha=8)
        after = model(ids)
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(lora_layers(model)) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down


def test_only_adapter_parameters_get_gradients(hf_dirs):
    model = apply_lora(lmlab.load_model(hf_dirs("llama-gqa-untied")), r=4, alpha=8)
    model(torch.randint(0, 97, (2, 9))).float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if ".lora_" in n}
    # B starts at zero, so at the first step only B moves (A's gradient is B^T-weighted: zero)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if n.endswith("lora_B"))


def test_merge_and_unmerge(hf_dirs):
    model = apply_lora(lmlab.load_model(hf_dirs("qwen2")), r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora(model)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        adapted = model(ids)
        layer = next(iter(lora_layers(model).values()))
        w = layer.base_layer.weight.clone()
        layer.merge()
        layer.unmerge()
        assert torch.allclose(layer.base_layer.weight, w, atol=1e-6)
        merged = merge_lora(model)
        assert not lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
        assert (merged(ids) - adapted).abs().max() < 1e-4


def test_lmlab_adapter_loads_in_peft(hf_dirs, tmp_path):
    base_dir = hf_dirs("llama-gqa-untied")
    model = apply_lora(lmlab.load_model(base_dir), r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path=str(base_dir))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4


def test_peft_adapter_loads_in_lmlab(hf_dirs, tmp_path):
    base_dir = hf_dirs("mistral-window")
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "gate_proj"], lora_dropout=0.0)
    hf = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    randomize_lora(hf)
    hf.save_pretrained(tmp_path)
    model = load_adapter(lmlab.load_model(base_dir), tmp_path)
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values()) and len(lora_layers(model)) == 6
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (hf.eval()(ids).logits - model(ids)).abs().max() < 1e-4


def test_clear_errors(hf_dirs):
    from lmlab.errors import ConfigError
    with pytest.raises(ConfigError, match="no linear layer matches"):
        apply_lora(lmlab.load_model(hf_dirs("llama")), targets=("c_attn",))
    gpt2 = apply_lora(lmlab.load_model(hf_dirs("gpt2")), targets=("q_proj",))
    with pytest.raises(ConfigError, match="no PEFT equivalent"):
        save_adapter(gpt2, "/tmp/unused-adapter")


def test_merge_lora_command(hf_dirs, tmp_path):
    import subprocess
    import sys
    base_dir = hf_dirs("llama")
    model = apply_lora(lmlab.load_model(base_dir), r=2, alpha=4, targets=("q_proj", "down_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    out = subprocess.run([sys.executable, "-m", "lmlab", "merge-lora", "--model", str(base_dir), "--adapter",
                          str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
