"""A/B of the inner loss: ``python inner_loss_ab.py CHECKOUT`` times the Pyro inner loss and
gradient against the plain-PyTorch one (median of 8 interleaved rounds) with the ltm_pyro of
CHECKOUT; run it once per checkout, alternately. Used by training-plan.md."""
import sys
import time

import pyro
import torch

sys.path.insert(0, sys.argv[1])
import ltm_pyro

print(ltm_pyro.__file__)
from ltm_pyro.config import preset
from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel, LocalPosterior

try:
    from ltm_pyro.objective import SyncFreeMeanFieldELBO
except ImportError:
    from ltm_pyro.inference import SyncFreeMeanFieldELBO
torch.manual_seed(0)
cfg = preset("small").model; cfg.vocab_size = 1000
ltm = LatentThoughtModel(Decoder(cfg))
for p in ltm.decoder.parameters(): p.requires_grad_(False)
tokens = torch.randint(0, 1000, (16, cfg.context + 1)); mask = torch.ones(16, cfg.context)
shape = (16, *ltm.latent_shape)
loc = torch.zeros(shape, requires_grad=True); lv = torch.full(shape, -2.0, requires_grad=True)
noise = torch.randn(shape)
elbo = SyncFreeMeanFieldELBO(max_plate_nesting=1)
def pyro_step():
    loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, LocalPosterior(loc, lv), noise)
    torch.autograd.grad(loss, [loc, lv])
def plain_step():
    local = LocalPosterior(loc, lv)
    z = local.loc + local.scale * noise
    logits = ltm.logits(tokens[:, :-1], z)
    nll = ltm.token_nll(logits, tokens[:, 1:], mask)
    kl = 0.5 * (local.log_var.exp() + local.loc.pow(2) - 1 - local.log_var)
    torch.autograd.grad(nll.sum() + kl.sum(), [loc, lv])
with pyro.validation_enabled(False):
    for f in (pyro_step, plain_step): f()
    ratios = []
    for r in range(8):
        t0 = time.perf_counter(); pyro_step(); t1 = time.perf_counter(); plain_step(); t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    ratios.sort(); print("median pyro/plain", ratios[len(ratios)//2], [round(x,3) for x in ratios])
