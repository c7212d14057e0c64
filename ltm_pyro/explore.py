"""A trained run for exploration: fit z to a text, score a text, generate from a posterior.

    run = ltm_pyro.load_run("runs/default")
    posterior = run.encode("some text in the corpus's language")
    run.score("some text")                  # elbo_ppl, iwae_ppl (bounds), recon_ppl (not one)
    run.generate(posterior, prompt="some")  # continue "some" with z at the posterior mean
    run.generate(run.prior(), max_new_tokens=20)

Every method goes through the library's own fitting, bounds and sampling (``inference``,
``bounds``, ``generate``), so what a notebook sees is what training and evaluation compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .bounds import evaluate_windows
from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import RunConfig
from .data import Corpus, load_corpus, to_windows
from .errors import UsageError
from .generate import posterior_latents, prior_latents, prompt_posterior, sample_tokens
from .latent_use import kl_per_window
from .model import LatentThoughtModel, LocalPosterior
from .tokenizers import Tokenizer, encode_prompt, known_token_count


@dataclass
class TextPosterior:
    """q(z | text) fitted to one text: its parameters and the tokens it was fitted to."""

    text: str
    tokens: Tensor  # [1, n] ids the posterior was fitted to (at most context + 1)
    posterior: LocalPosterior  # loc and log_var, each [1, N_z, latent_dim]

    @property
    def mean(self) -> Tensor:
        return self.posterior.loc

    def kl(self) -> float:
        """KL(q || prior) in nats: what this text's latents cost the bound."""
        return float(kl_per_window(self.posterior).sum())


@dataclass
class TrainedRun:
    """A run folder's model, config and corpus; the methods below are the exploration API."""

    ltm: LatentThoughtModel
    config: RunConfig
    corpus: Corpus
    device: torch.device

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer

    def _ids(self, text: str) -> list[int]:
        ids = encode_prompt(self.tokenizer, text)
        if known_token_count(self.tokenizer, torch.tensor(ids)) == 0:
            raise UsageError("no token of the text is in the run's vocabulary; write it in the "
                             "training corpus's language")
        return ids

    def encode(self, text: str, steps: int | None = None, seed: int = 0) -> TextPosterior:
        """Fit q(z | text) with ``steps`` inner steps (default: the training T), as evaluation
        does; a text longer than the context is fitted on its first context + 1 tokens."""
        if not self.ltm.has_latents:
            raise UsageError("this run is an AR model: it has no latents to fit")
        ids = self._ids(text)[: self.config.model.context + 1]
        if len(ids) < 2:
            raise UsageError("the text needs at least two tokens: one to condition on, one to "
                             "predict")
        tokens = torch.tensor([ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return TextPosterior(text, tokens, prompt_posterior(
            self.ltm, tokens, self.config.inference, steps, generator))

    def score(self, text: str, steps: int | None = None, iw_samples: int = 16,
              elbo_samples: int = 4, seed: int = 0) -> dict[str, float]:
        """The three figures on the text's windows: ``elbo_ppl`` and ``iwae_ppl`` (valid
        bounds) and ``recon_ppl`` (KL left out: not a bound), with per-token terms."""
        ids = self._ids(text)
        if len(ids) < self.config.model.context + 1:
            windows = torch.tensor([ids])
        else:
            windows = to_windows(ids, self.config.model.context)
        return evaluate_windows(self.ltm, windows, self.config.inference, steps=steps,
                                elbo_samples=elbo_samples, iw_samples=iw_samples, seed=seed,
                                device=self.device)

    def prior(self, scale: float = 1.0, seed: int = 0) -> Tensor | None:
        """One z drawn from the prior N(0, scale^2 I), [1, N_z, latent_dim]."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return prior_latents(self.ltm, 1, scale, generator, self.device)

    def generate(self, latent: TextPosterior | Tensor | None = None, prompt: str | None = None,
                 max_new_tokens: int = 32, temperature: float = 1.0, greedy: bool = False,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
        """Continue ``prompt`` (default: the first token the posterior was fitted to, or the
        first token of the first validation window) with z fixed to ``latent``: a
        TextPosterior (its mean), a z tensor, or None (fit z to the prompt, as
        experiments/generate.py does; the AR baseline needs none)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if prompt is not None:
            start = torch.tensor([self._ids(prompt)[-self.config.model.context:]],
                                 device=self.device)
        elif isinstance(latent, TextPosterior):
            start = latent.tokens[:, :1]
        else:
            start = self.corpus.windows["valid"][:1, :1].to(self.device)
        z = latent.mean if isinstance(latent, TextPosterior) else latent
        if z is None and self.ltm.has_latents:
            z = posterior_latents(self.ltm, start, self.config.inference, generator=generator)
        new = min(max_new_tokens, self.config.model.context + 1 - start.shape[1])
        tokens = sample_tokens(self.ltm, start, new, z, temperature, greedy, generator,
                               top_k=top_k, top_p=top_p)
        return self.tokenizer.decode(tokens[0, start.shape[1]:].tolist())


def load_run(out: Path | str, device: str | torch.device = "cpu") -> TrainedRun:
    """A finished (or interrupted) run folder, ready to explore; refuses anything but a
    checkpoint written by run_svi.py (in one line, without executing it)."""
    device = torch.device(device)
    ltm, config, tokenizer = model_from_checkpoint(load_checkpoint(out, map_location=device),
                                                   device)
    return TrainedRun(ltm, config, load_corpus(config.data, config.model.context, tokenizer),
                      device)
