"""ltm-pyro: Latent-Thought Language Models as a Pyro probabilistic program.

Modules by layer (docs/design.md §3); a layer imports from itself, the ones above and plumbing:

- core: ``decoder``, ``model`` (Pyro model + guide), ``objective`` (terms from the traces),
  ``inference`` (fast loop), ``svi`` (dual rate), ``amortised`` (encoder proposals), ``mdlm``
  (the masked-diffusion baseline)
- evaluation: ``bounds`` (three figures), ``latent_use``, ``uncertainty`` (paired intervals),
  ``diagnostics``, ``sample_quality``, ``fewshot``
- runs and files: ``families`` (LTM, AR and MDLM behind one interface), ``runner``,
  ``training_state``, ``comparisons``, ``checkpoint``, ``files``,
  ``data``, ``synthetic``, ``tokenizers``, ``report``, ``viz``, ``generate``, ``explore``
  (``load_run``: encode, score, generate), ``posterior`` (fitted q as data), ``run_folder``
- studies: ``studies`` (what an experiment computes; its script is only a command line)
- plumbing: ``config`` (presets, recipes), ``cli``, ``commands`` (console scripts), ``errors``,
  ``modes``, ``distributed``, ``flops``
"""

import importlib

# Loaded on first use (PEP 562), so a command's --help never imports torch or Pyro.
_EXPORTS = {
    "Decoder": "decoder", "DualRateSVI": "svi", "InferenceConfig": "config",
    "LatentThoughtModel": "model", "LocalPosterior": "model", "ModelConfig": "config",
    "Posteriors": "posterior", "RunConfig": "config", "TextPosterior": "posterior",
    "TrainConfig": "config", "TrainedRun": "explore", "fit_local_posterior": "inference",
    "family_of": "families", "load_run": "explore", "preset": "config", "train": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ltm_pyro' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
