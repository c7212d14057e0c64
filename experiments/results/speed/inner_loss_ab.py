"""A/B of the inner loss: ``python inner_loss_ab.py CHECKOUT`` times the Pyro inner loss and
gradient against the plain-PyTorch one (median of 8 interleaved rounds) with the ltm_pyro of
CHECKOUT; run it once per checkout, alternately. Used by training-plan.md."""

import importlib
import sys
import time

import pyro
import torch


def main(checkout: str) -> None:
    sys.path.insert(0, checkout)
    config = importlib.import_module("ltm_pyro.config")
    decoder = importlib.import_module("ltm_pyro.decoder")
    model = importlib.import_module("ltm_pyro.model")
    try:  # the ELBO moved from inference.py to objective.py in the refactor
        elbo_class = importlib.import_module("ltm_pyro.objective").SyncFreeMeanFieldELBO
    except ImportError:
        elbo_class = importlib.import_module("ltm_pyro.inference").SyncFreeMeanFieldELBO
    torch.manual_seed(0)
    shape_config = config.preset("small").model
    shape_config.vocab_size = 1000
    ltm = model.LatentThoughtModel(decoder.Decoder(shape_config))
    for p in ltm.decoder.parameters():
        p.requires_grad_(False)
    tokens = torch.randint(0, 1000, (16, shape_config.context + 1))
    mask = torch.ones(16, shape_config.context)
    shape = (16, *ltm.latent_shape)
    loc = torch.zeros(shape, requires_grad=True)
    log_var = torch.full(shape, -2.0, requires_grad=True)
    noise = torch.randn(shape)
    elbo = elbo_class(max_plate_nesting=1)

    def pyro_step() -> None:
        local = model.LocalPosterior(loc, log_var)
        loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise)
        torch.autograd.grad(loss, [loc, log_var])

    def plain_step() -> None:
        z = loc + torch.exp(0.5 * log_var) * noise
        nll = ltm.token_nll(ltm.logits(tokens[:, :-1], z), tokens[:, 1:], mask)
        kl = 0.5 * (log_var.exp() + loc.pow(2) - 1 - log_var)
        torch.autograd.grad(nll.sum() + kl.sum(), [loc, log_var])

    with pyro.validation_enabled(False):
        pyro_step(), plain_step()  # warm-up
        ratios = []
        for _ in range(8):
            start = time.perf_counter()
            pyro_step()
            middle = time.perf_counter()
            plain_step()
            ratios.append((middle - start) / (time.perf_counter() - middle))
    ratios.sort()
    print(f"{checkout}: median pyro/plain {ratios[len(ratios) // 2]:.3f}",
          [round(r, 3) for r in ratios])


if __name__ == "__main__":
    main(sys.argv[1])
