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

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .bounds import ScoringConfig, combined_summary, evaluate_windows, per_byte
from .checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from .config import RunConfig
from .data import Corpus, load_corpus, to_windows
from .errors import UsageError
from .files import read_jsonl
from .generate import (
    Sampling,
    continue_tokens,
    posterior_latents,
    prior_latents,
    prompt_posterior,
)
from .inference import fit_local_posterior
from .model import LatentThoughtModel, LocalPosterior
from .modes import evaluating, resolve_device
from .posterior import Posteriors, TextPosterior
from .run_folder import corpus_path, read_tokenizer, start_token
from .tokenizers import UNK_WARNING, Tokenizer, encode_prompt, known_token_count, unk_rate


@dataclass
class TrainedRun:
    """A run folder's model, config and tokenizer; the methods below are the exploration API.
    Nothing here needs the training corpus (``splits`` reads it when it is at hand)."""

    ltm: LatentThoughtModel
    config: RunConfig
    tokenizer: Tokenizer
    device: torch.device
    folder: Path

    def __repr__(self) -> str:
        corpus = Path(self.config.data.path).name if self.config.data.path else "built-in"
        valid = [r for r in read_jsonl(self.folder / "metrics.jsonl") if r["split"] == "valid"] if (
            (self.folder / "metrics.jsonl").exists()) else []
        bound = f", valid -ELBO {valid[-1]['neg_elbo']:.3f} nats/token" if valid else ""
        return (f"TrainedRun({str(self.folder)!r}: {self.config.model_kind}, preset "
                f"{self.config.preset}, {self.ltm.decoder.num_parameters():,} parameters, "
                f"corpus {corpus}, {self.config.train.max_steps} steps{bound})")

    def splits(self, data: str | Path | None = None) -> Corpus:
        """The corpus' windows by split, tokenized as in training: the run's own corpus, or
        ``data`` (a text file or folder of splits) when given."""
        return load_corpus(replace(self.config.data, path=corpus_path(self.config, data)),
                           self.config.model.context, self.tokenizer)

    def _ids(self, text: str) -> list[int]:
        ids = encode_prompt(self.tokenizer, text)
        if known_token_count(self.tokenizer, torch.tensor(ids)) == 0:
            raise UsageError("no token of the text is in the run's vocabulary; write it in the "
                             "training corpus's language")
        return ids

    def encode(self, texts: str | list[str], steps: int | None = None, seed: int = 0,
               batch_size: int = 64) -> TextPosterior | Posteriors:
        """Fit q(z | text) with ``steps`` inner steps (default: the training T), as evaluation
        does, on each text's first context + 1 tokens. One text gives a ``TextPosterior``; a
        list gives ``Posteriors`` of them all, fitted ``batch_size`` at a time (shorter texts
        padded and masked; a progress bar when it takes more than a few seconds), as
        scvi-tools' ``get_latent_representation`` does."""
        if not self.ltm.has_latents:
            raise UsageError("this run is an AR model: it has no latents to fit")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        n_layers = self.config.model.n_layers
        if isinstance(texts, str):
            tokens = torch.tensor([self._fit_ids(texts)], device=self.device)
            posterior = prompt_posterior(self.ltm, tokens, self.config.inference, steps,
                                         generator)
            return TextPosterior([texts], posterior, n_layers, tokens)
        ids = [self._fit_ids(text, f"text {i}") for i, text in enumerate(texts)]
        parts = []
        for start in tqdm(range(0, len(ids), batch_size), desc="encode", delay=3,
                          disable=len(ids) <= batch_size):
            parts.append(self._fit_batch(ids[start:start + batch_size], steps, generator))
        return Posteriors(list(texts), LocalPosterior.concatenate(parts), n_layers)

    def _fit_ids(self, text: str, name: str = "the text") -> list[int]:
        ids = self._ids(text)[: self.config.model.context + 1]
        if len(ids) < 2:
            raise UsageError(f"{name} has {len(ids)} token; fitting z needs at least two: one "
                             "to condition on, one to predict")
        return ids

    def _fit_batch(self, ids: list[list[int]], steps: int | None,
                   generator: torch.Generator) -> LocalPosterior:
        """One batch of texts padded to the longest, each fitted on its own tokens only."""
        longest = max(map(len, ids))
        tokens = torch.zeros(len(ids), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(ids), longest - 1, device=self.device)
        for row, text_ids in enumerate(ids):
            tokens[row, : len(text_ids)] = torch.tensor(text_ids)
            mask[row, : len(text_ids) - 1] = 1
        with evaluating(self.ltm.decoder), torch.enable_grad():
            return fit_local_posterior(self.ltm, tokens, mask, self.config.inference, generator,
                                       steps=steps).posterior.detach()

    def score(self, text: str, steps: int | None = None, iw_samples: int = 16,
              elbo_samples: int = 4, seed: int = 0) -> dict[str, float]:
        """The three figures over the whole text: ``elbo_ppl`` and ``iwae_ppl`` (valid
        bounds) and ``recon_ppl`` (KL left out: not a bound), with per-token terms, the
        predicted ``tokens``, ``unk_rate`` (their share of ``<unk>``, warned above 5%: unknown
        words make a text look easier than it is) and ``bits_per_byte`` (the iwae bound per
        UTF-8 byte). A text longer than the context is scored as evaluation scores a split:
        window after window, each fitted on its own, the last one shorter."""
        ids = self._ids(text)
        if len(ids) < 2:
            raise UsageError(f"the text has {len(ids)} token; scoring needs at least two: one "
                             "to condition on, one to predict")
        context = self.config.model.context
        windows = to_windows(ids, context)
        rest = ids[len(windows) * context:]  # after the last full window (sharing its end)
        batches = [windows] if len(windows) else []
        if len(rest) >= 2:
            batches.append(torch.tensor([rest]))
        scoring = ScoringConfig(steps=steps, elbo_samples=elbo_samples, iw_samples=iw_samples,
                                seed=seed)
        summary = combined_summary([evaluate_windows(self.ltm, batch, self.config.inference,
                                                     scoring, device=self.device)
                                    for batch in batches])
        predicted = torch.tensor(ids[1:])
        summary["unk_rate"] = unk_rate(self.tokenizer, predicted)
        if summary["unk_rate"] > UNK_WARNING:
            warnings.warn(f"{summary['unk_rate']:.0%} of the scored tokens are <unk>: the "
                          "figures are easier than the text is", stacklevel=2)
        summary.update(per_byte(summary, self.tokenizer.text_bytes(predicted.tolist())))
        return summary

    def prior(self, scale: float = 1.0, seed: int = 0) -> Tensor | None:
        """One z drawn from the prior N(0, scale^2 I), [1, N_z, latent_dim]."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return prior_latents(self.ltm, 1, scale, generator, self.device)

    def generate(self, latent: TextPosterior | Tensor | None = None, prompt: str | None = None,
                 max_new_tokens: int = 32, temperature: float = 1.0, greedy: bool = False,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 num_samples: int = 1, details: bool = False
                 ) -> str | list[str] | GeneratedText:
        """Continue ``prompt`` (default: the first token the posterior was fitted to, or the
        end-of-line token, ``run_folder.start_token``) by ``max_new_tokens`` tokens, past the
        context if asked (``generate.continue_tokens``), with z fixed to ``latent``: a
        TextPosterior (its mean), a z tensor, or None (fit z to the prompt's last context
        tokens, as experiments/generate.py does; the AR baseline needs none). One sample
        gives its text, ``num_samples`` > 1 a list; ``details`` a ``GeneratedText`` with the
        ids and each token's log-probability under the model."""
        if max_new_tokens < 0 or num_samples < 1:
            raise UsageError("max_new_tokens must be 0 or more and num_samples 1 or more")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if prompt is not None:
            start = torch.tensor([self._ids(prompt)[-self.config.model.context:]],
                                 device=self.device)
        elif isinstance(latent, TextPosterior):
            start = latent.tokens[:, :1]
        else:
            start = torch.tensor([[start_token(self.tokenizer)]], device=self.device)
        z = latent.mean if isinstance(latent, TextPosterior) else latent
        if z is None and self.ltm.has_latents:
            z = posterior_latents(self.ltm, start, self.config.inference, generator=generator)
        if z is not None:
            z = z.expand(num_samples, *z.shape[1:])
        ids, log_probs = continue_tokens(
            self.ltm, start.expand(num_samples, -1), max_new_tokens, z,
            Sampling(temperature, top_k, top_p, greedy), generator, with_log_probs=details)
        texts = [self.tokenizer.decode(row.tolist()) for row in ids]
        if details:
            return GeneratedText(texts, ids, log_probs)
        return texts[0] if num_samples == 1 else texts


@dataclass
class GeneratedText:
    """Samples with what made them: the texts, their new token ids [n, new] and each
    token's log-probability under the model (temperature 1, unfiltered) [n, new]."""

    texts: list[str]
    ids: Tensor
    log_probs: Tensor


def load_run(out: Path | str, device: str | torch.device = "cpu") -> TrainedRun:
    """A finished (or interrupted) run folder, ready to explore; refuses anything but a
    checkpoint written by run_svi.py (in one line, without executing it)."""
    device = resolve_device(str(device))
    payload = load_checkpoint(out, map_location=device)
    ltm, config, _ = model_from_checkpoint(payload, device)
    folder = checkpoint_path(Path(out)).parent
    return TrainedRun(ltm, config, read_tokenizer(folder, payload), device, folder)
