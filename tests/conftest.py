from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pyro
import pytest
import torch
import torch.nn.functional as F

from ltm_pyro.config import InferenceConfig, ModelConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LTM_PYRO_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _validated_and_seeded():
    """Pyro validation on in every test (the inner loop runs without it for speed)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    with pyro.validation_enabled(True):
        yield


def micro_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=23, context=12, d_model=32, n_layers=2, n_heads=2,
                  latents_per_layer=2, window=4)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def ltm() -> LatentThoughtModel:
    return LatentThoughtModel(Decoder(micro_config()))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 23, (5, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 12)
    mask[1, 8:] = 0  # a padded sequence
    mask[3, 10:] = 0
    return tokens, mask


@pytest.fixture
def inference() -> InferenceConfig:
    return InferenceConfig(steps=6)


def load_script(name: str) -> ModuleType:
    """An ``experiments/`` script as a module, so its ``main`` runs in-process."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                  REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train_in_process(out: Path, *args: str) -> Path:
    """``python experiments/run_svi.py --out OUT ARGS`` in this process; returns OUT."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["run_svi.py", "--out", str(out), *args])
        assert load_script("run_svi").main() == 0
    return out


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared corpus {path} not present (set LTM_PYRO_DATA)")
    return path


def sequence_nll(decoder: Decoder, tokens: torch.Tensor, z: torch.Tensor | None,
                 mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed next-token NLL, written out with cross-entropy: the reference
    the step tests compare the library's losses and gradients against."""
    logits = decoder(tokens[:, :-1], z)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(),
                          reduction="none").view(tokens.shape[0], -1)
    return (nll * mask).sum(-1)


def assert_gradients_match(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Float32 gradients summed in another order (another machine's kernels) differ by a few
    units in the last place of the tensor's largest entry, so the absolute tolerance scales
    with it; a wrong gradient (a missing term, a leak) differs by far more."""
    atol = 1e-6 * float(expected.abs().max()) + 1e-9
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=name)
