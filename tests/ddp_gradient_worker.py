"""One DualRateSVI step on a fixed global batch; run alone, or under torchrun where each rank
takes its shard. Saves the decoder gradient of that first slow step (rank 0) for the test."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.config import InferenceConfig, ModelConfig, TrainConfig  # noqa: E402
from ltm_pyro.decoder import Decoder  # noqa: E402
from ltm_pyro.distributed import process_group, shard_from_environment  # noqa: E402
from ltm_pyro.model import LatentThoughtModel  # noqa: E402
from ltm_pyro.svi import DualRateSVI  # noqa: E402


def main(out: str, decoder_grads: str, noise: str) -> None:
    shard = shard_from_environment()
    with process_group(shard, torch.device("cpu")):
        # In a function of its own, so the DDP wrapper and its gloo work are freed before
        # the process group is torn down (a wrapper outliving it aborted rank 1 at exit).
        _step_and_save(shard, out, decoder_grads, noise)


def _step_and_save(shard, out: str, decoder_grads: str, noise: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=31, context=12, d_model=32, n_layers=2, n_heads=2,
                         latents_per_layer=2, window=4)
    ltm = LatentThoughtModel(Decoder(config))
    tokens = torch.randint(0, 31, (8, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(8, 12)
    svi = DualRateSVI(ltm, InferenceConfig(steps=4, noise=noise),
                      TrainConfig(grad_clip=1e9, decoder_grads=decoder_grads),
                      torch.Generator().manual_seed(2), shard)
    stats = svi.step(shard.slice(tokens), shard.slice(mask))
    if shard.is_main:
        grads = {name: p.grad for name, p in ltm.decoder.named_parameters()}
        torch.save({"grads": grads, "nll": stats.nll, "kl": stats.kl}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
