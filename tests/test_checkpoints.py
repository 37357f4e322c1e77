"""Model directories: v4 and v5 config keys, original GPT-2 files, sharded files, and clear errors on bad input."""
import json
import pickle
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lmlab
from lmlab.errors import CheckpointError, ConfigError


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def logits_match(a_dir, b_model, vocab=97):
    hf = transformers.AutoModelForCausalLM.from_pretrained(a_dir).eval()
    ids = torch.randint(0, vocab, (2, 10))
    with torch.no_grad():
        return (hf(ids).logits - b_model(ids)).abs().max().item()


@pytest.mark.parametrize("case", ["llama3-rope", "yarn-rope", "linear-rope"])
def test_transformers_v4_rope_keys(case, hf_dirs, tmp_path):
    """Real checkpoints in the wild write rope_theta + rope_scaling (v4) and torch_dtype."""
    d = copy(hf_dirs(case), tmp_path / "v4")

    def to_v4(cfg):
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")  # the oldest spelling
        cfg["rope_scaling"] = rope
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    edit_config(d, to_v4)
    model = lmlab.load_model(d)
    assert model.config.rope_scaling["rope_type"] == case.split("-")[0]
    assert logits_match(hf_dirs(case), model) <= 1e-4  # the v5 original: same model


def test_original_gpt2_layout(hf_dirs, tmp_path):
    """The original GPT-2 files: no `transformer.` prefix, attention-mask buffers, n_ctx, no lm_head."""
    d = copy(hf_dirs("gpt2"), tmp_path / "gpt2")
    tensors = load_file(d / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(old, d / "model.safetensors", metadata={"format": "pt"})
    edit_config(d, lambda c: c.update(n_ctx=c.pop("n_positions")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the buffer is known, not reported as unused
        model = lmlab.load_model(d)
    assert logits_match(hf_dirs("gpt2"), model) <= 1e-4


def test_sharded_save_and_load(hf_dirs, tmp_path):
    model = lmlab.load_model(hf_dirs("llama-gqa-untied"))
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.startswith("model-") for f in files) > 2
    assert logits_match(tmp_path / "sharded", model) <= 1e-4
    again = lmlab.load_model(tmp_path / "sharded")
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_safe_bin_checkpoint(hf_dirs, tmp_path):
    """pytorch_model.bin loads with weights_only=True: tensors work, pickled code is refused."""
    d = copy(hf_dirs("qwen2"), tmp_path / "bin")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(tensors, d / "pytorch_model.bin")
    assert logits_match(hf_dirs("qwen2"), lmlab.load_model(d)) <= 1e-4

    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        lmlab.load_model(d)
    assert not (tmp_path / "PWNED").exists() and not (d / "PWNED").exists()


def test_bf16_load_and_save(hf_dirs, tmp_path):
    model = lmlab.load_model(hf_dirs("llama"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_bf16_load_keeps_rope_frequencies_fp32(hf_dirs):
    """RoPE's frequencies stay fp32 in a bf16 model (load_model(dtype=...) and .to()), as in transformers'
    from_pretrained(dtype=...): rounded to bf16 they would turn the rotation at position 4000 by up to 1.5 rad."""
    path = hf_dirs("llama")
    m32, m16 = lmlab.load_model(path), lmlab.load_model(path, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert m16.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(m16.rotary.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    pos = torch.arange(4096)[None]
    ref = m32.rotary(pos, torch.float32)  # before m32 is cast below
    for model in (m16, m32.to(torch.bfloat16)):
        for a, b in zip(model.rotary(pos, torch.float32), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- errors
def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        lmlab.load_model(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        lmlab.load_model(tmp_path)


def test_invalid_json(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 2"):
        lmlab.load_model(d)


def test_unknown_architecture(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    edit_config(d, lambda c: c.update(model_type="mamba", architectures=["MambaForCausalLM"]))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba'.*MambaForCausalLM.*not supported"):
        lmlab.load_model(d)


@pytest.mark.parametrize("case,field", [("llama", "hidden_size"), ("gpt2", "n_embd"), ("mixtral", "num_local_experts")])
def test_missing_config_field(case, field, hf_dirs, tmp_path):
    d = copy(hf_dirs(case), tmp_path / "m")
    edit_config(d, lambda c: c.pop(field))
    with pytest.raises(CheckpointError, match=rf"config.json: required field '{field}' is missing"):
        lmlab.load_model(d)


def test_inconsistent_config(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    edit_config(d, lambda c: c.update(num_key_value_heads=3))
    with pytest.raises(CheckpointError, match="multiple of num_key_value_heads"):
        lmlab.load_model(d)


def test_missing_tensor(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        lmlab.load_model(d)


def test_misshaped_tensor(hf_dirs, tmp_path):
    d = copy(hf_dirs("mixtral"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*shape \(64, 64\), expected \(32, 64\)"):
        lmlab.load_model(d)


def test_truncated_safetensors(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lmlab.load_model(d)


def test_missing_shard(hf_dirs, tmp_path):
    model = lmlab.load_model(hf_dirs("llama"))
    model.save_pretrained(tmp_path / "s", max_shard_bytes=20_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-.*missing"):
        lmlab.load_model(tmp_path / "s")


def test_no_weights(hf_dirs, tmp_path):
    d = copy(hf_dirs("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        lmlab.load_model(d)


def test_unsaveable_combination(tmp_path):
    cfg = lmlab.preset("tiny", model_type="llama", norm="layernorm")
    with pytest.raises(ConfigError, match="cannot express.*norm"):
        lmlab.build(cfg).save_pretrained(tmp_path)


def test_save_is_atomic(hf_dirs, tmp_path, monkeypatch):
    """A failure while writing leaves the previous files intact and no temp files behind."""
    model = lmlab.load_model(hf_dirs("llama"))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
