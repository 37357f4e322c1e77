from lmlab.inference.engine import generate_ids, stream_ids
from lmlab.inference.sampling import SamplingParams, sample

__all__ = ["SamplingParams", "generate_ids", "sample", "stream_ids"]
