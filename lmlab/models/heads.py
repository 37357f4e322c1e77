"""A decoder backbone with a scalar head: the reward model and PPO's value model.

    values = score(backbone.hidden_states(ids))        # (B, T): one number per position
    reward = values at each row's last real token       # (B,)

Saved as `<Arch>ForSequenceClassification` with num_labels=1 (the layout TRL's RewardTrainer writes and
transformers loads): the backbone under its usual names without the LM head, plus `score.weight` (1, H).
transformers reads the score at the last token that is not `pad_token_id`; with right padding that is
the last real token here too, so both give the same reward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.errors import CheckpointError
from lmlab.models.layers import ModelBase


class ScalarHead(ModelBase):
    family = "decoder"

    def __init__(self, backbone):
        super().__init__()
        backbone.lm_head = None  # unused (a tied head is the embedding and stays)
        self.backbone, self.config = backbone, backbone.config
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False,
                               device=backbone.device, dtype=backbone.dtype)
        if backbone.device.type != "meta":
            nn.init.normal_(self.score.weight, std=1 / (backbone.config.hidden_size + 1) ** 0.5)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """input_ids (B, T) -> values (B, T) in float32. Arguments as in Decoder.forward."""
        h = self.backbone.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, H)
        return self.score(h).squeeze(-1).float()

    def reward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) the value at each row's last real token (the last 1 of attention_mask; T - 1 without one)."""
        values = self(input_ids, attention_mask)
        if attention_mask is None:
            return values[:, -1]
        positions = torch.arange(values.shape[1], device=values.device)
        last = (positions * attention_mask.to(values.device)).argmax(-1)  # (B,)
        return values.gather(1, last[:, None]).squeeze(1)

    def save_pretrained(self, out_dir, dtype=None, **kw):
        from lmlab.interop.hf import config_to_hf, hf_state_dict, write_model_dir

        dtype = dtype or self.dtype
        config = config_to_hf(self.config, dtype)
        arch = config["architectures"][0].replace("LMHeadModel", "ForCausalLM")  # GPT2LMHeadModel
        config |= {"architectures": [arch.replace("ForCausalLM", "ForSequenceClassification")], "num_labels": 1,
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        tensors = {k: v for k, v in hf_state_dict(self.backbone).items() if k != "lm_head.weight"}
        tensors["score.weight"] = self.score.weight
        write_model_dir(out_dir, tensors, config, self.config, dtype, **kw)


def load_scalar_model(backbone_on_meta, path, raw_config: dict, device="cpu", dtype=None) -> ScalarHead:
    """A `*ForSequenceClassification` directory with one label -> ScalarHead (called by interop.hf.load_model)."""
    from lmlab.interop.hf import WeightFiles, load_weights

    labels = raw_config.get("num_labels", len(raw_config.get("id2label") or {}) or 1)
    if labels != 1:
        raise CheckpointError(f"{path}/config.json: a sequence classifier with {labels} labels; lmlab loads "
                              f"decoder classifiers with one output (reward models) only")
    model = ScalarHead(backbone_on_meta)
    model.to_empty(device=device)
    if model.backbone.rotary is not None:
        model.backbone.rotary.reset()
    load_weights(model.backbone, path, expected_unused=("score.weight",))
    files = WeightFiles(path)
    if "score.weight" not in files.names():
        raise CheckpointError(f"{path}: tensor 'score.weight' (the reward head) is missing")
    score = files.get("score.weight")
    if tuple(score.shape) != (1, model.config.hidden_size):
        raise CheckpointError(f"{path}: tensor 'score.weight' has shape {tuple(score.shape)}, expected "
                              f"(1, {model.config.hidden_size})")
    with torch.no_grad():
        model.score.weight.copy_(score)
    model.eval()
    return model.to(dtype) if dtype is not None else model
