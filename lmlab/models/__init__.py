"""Model families. `build(config)` makes a randomly initialised model from a ModelConfig."""
from lmlab.config import ModelConfig
from lmlab.models.decoder import Decoder


def build(cfg: ModelConfig):
    return Decoder(cfg)
