"""Model families. `build(config)` makes a randomly initialised model from a ModelConfig."""
from lmlab.config import ModelConfig
from lmlab.models.decoder import Decoder


def build(cfg: ModelConfig):
    """decoder (GPT-2, Llama, Mistral, Mixtral, Qwen2), encoder (BERT, RoBERTa: with the masked-LM head) or
    encoder-decoder (T5, BART), by cfg.model_type."""
    if cfg.family == "encoder":
        from lmlab.models.encoder import Encoder
        return Encoder(cfg)
    if cfg.model_type == "bart":
        from lmlab.models.bart import Bart
        return Bart(cfg)
    if cfg.family == "encoder-decoder":
        from lmlab.models.encoder_decoder import T5
        return T5(cfg)
    return Decoder(cfg)
