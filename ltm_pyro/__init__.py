"""ltm-pyro: Latent-Thought Language Models as a Pyro probabilistic program.

The pieces, each in its own module: ``decoder`` (the Transformer), ``model`` (the Pyro model
and guide), ``inference`` (the fast loop), ``svi`` (dual-rate SVI), ``bounds`` (honest
metrics), ``data`` / ``synthetic`` / ``tokenizers`` (corpora), ``runner`` (a training run in a
folder), ``checkpoint`` and ``viz``.
"""

from .config import InferenceConfig, ModelConfig, RunConfig, TrainConfig, preset
from .decoder import Decoder
from .inference import fit_local_posterior
from .model import LatentThoughtModel, LocalPosterior
from .svi import DualRateSVI

__all__ = [
    "Decoder", "DualRateSVI", "InferenceConfig", "LatentThoughtModel", "LocalPosterior",
    "ModelConfig", "RunConfig", "TrainConfig", "fit_local_posterior", "preset",
]
__version__ = "0.1.0"
