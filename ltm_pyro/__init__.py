"""ltm-pyro: Latent-Thought Language Models as a Pyro probabilistic program.

Modules by layer (docs/design.md §3); a layer imports from itself, the ones above and plumbing:

- core: ``decoder``, ``model`` (Pyro model + guide), ``objective`` (terms from the traces),
  ``inference`` (fast loop), ``svi`` (dual rate), ``amortised`` (encoder proposals), ``mdlm``
  (the masked-diffusion baseline)
- evaluation: ``bounds`` (three figures), ``latent_use``, ``uncertainty`` (paired intervals),
  ``diagnostics``, ``sample_quality``, ``fewshot``
- runs and files: ``runner``, ``training_state``, ``comparisons``, ``checkpoint``, ``files``,
  ``data``, ``synthetic``, ``tokenizers``, ``report``, ``viz``, ``generate``, ``explore``
  (``load_run``: encode, score, generate)
- plumbing: ``config`` (presets, recipes), ``cli``, ``commands`` (console scripts), ``errors``,
  ``modes``, ``distributed``, ``flops``
"""

from .config import InferenceConfig, ModelConfig, RunConfig, TrainConfig, preset
from .decoder import Decoder
from .explore import TextPosterior, TrainedRun, load_run
from .inference import fit_local_posterior
from .model import LatentThoughtModel, LocalPosterior
from .svi import DualRateSVI

__all__ = [
    "Decoder", "DualRateSVI", "InferenceConfig", "LatentThoughtModel", "LocalPosterior",
    "ModelConfig", "RunConfig", "TextPosterior", "TrainConfig", "TrainedRun",
    "fit_local_posterior", "load_run", "preset",
]
__version__ = "0.1.0"
