"""Fitted posteriors as data: q(z | text) for one text or many, with their moments, draws,
KL and an ArviZ export, so a notebook can study them without touching the fitting code.

z of a text is [N_z, d]: ``n_layers`` groups of ``latents_per_layer`` slots, each a d-vector
(docs/design.md §1); ``to_inference_data`` names those dimensions ``layer``, ``slot`` and
``dim``, and the texts ``text``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .latent_use import kl_per_slot
from .model import LocalPosterior


@dataclass
class Posteriors:
    """q(z | text) = N(mean, std^2) of each of B texts: ``posterior`` holds [B, N_z, d]."""

    texts: list[str]
    posterior: LocalPosterior
    n_layers: int

    def __repr__(self) -> str:
        b, n_z, d = self.posterior.loc.shape
        return (f"{type(self).__name__}({b} text{'s' * (b != 1)}, z {self.n_layers} layers x "
                f"{n_z // self.n_layers} slots x {d} dims, KL {self.kl_per_slot().sum():.2f} "
                "nats in all)")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def mean(self) -> Tensor:
        return self.posterior.loc

    @property
    def std(self) -> Tensor:
        return self.posterior.scale

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` draws of z from each text's q: [n, B, N_z, d]."""
        generator = torch.Generator(device=self.mean.device).manual_seed(seed)
        noise = torch.randn((n, *self.mean.shape), generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def kl_per_slot(self) -> Tensor:
        """KL(q || N(0, I)) of each slot of each text, [B, N_z] nats."""
        return kl_per_slot(self.posterior)

    def kl_per_text(self) -> Tensor:
        """KL(q || N(0, I)) of each text's whole z, [B] nats: what its latents cost the bound."""
        return self.kl_per_slot().sum(-1)

    def numpy(self) -> dict[str, np.ndarray]:
        """``mean`` and ``std`` as arrays [B, N_z, d]."""
        return {"mean": self.mean.detach().cpu().numpy(), "std": self.std.detach().cpu().numpy()}

    def to_inference_data(self, draws: int = 200, seed: int = 0):  # noqa: ANN201 - InferenceData
        """ArviZ ``InferenceData`` with ``draws`` draws of z from q (one chain), its
        dimensions named text, layer, slot and dim (``az.summary``, ``az.plot_forest``)."""
        import arviz as az

        z = self.sample(draws, seed).detach().cpu().numpy()
        n, b, n_z, d = z.shape
        z = z.reshape(1, n, b, self.n_layers, n_z // self.n_layers, d)
        return az.from_dict(posterior={"z": z}, dims={"z": ["text", "layer", "slot", "dim"]},
                            coords={"text": list(range(b))})


@dataclass(repr=False)
class TextPosterior(Posteriors):
    """q(z | text) fitted to one text, with the tokens it was fitted to ([1, n] ids, at most
    context + 1)."""

    tokens: Tensor | None = None

    @property
    def text(self) -> str:
        return self.texts[0]

    def kl(self) -> float:
        """KL(q || prior) in nats: what this text's latents cost the bound."""
        return float(self.kl_per_text().sum())
