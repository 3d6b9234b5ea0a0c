"""Networks for the experiments: a fully connected net with optional normalization before each nonlinearity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Sequence

import torch
from torch import nn

from covshift.nn.norms import get_norm_layer

if TYPE_CHECKING:
    from covshift.experiments.config import ExperimentConfig
    from covshift.experiments.data import Dataset

__all__ = ["MLP", "Activation", "ACTIVATIONS", "build_mlp"]

Activation = Literal["sigmoid", "tanh", "relu"]
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class HiddenLayer(nn.Module):
    """``act(norm(W u))`` (Ioffe & Szegedy's placement), or ``act(W u + b)`` without normalization.

    With a normalization the linear layer's own bias is dropped: the norm's shift (BN's ``beta``)
    takes its role.
    """

    def __init__(self, in_features: int, out_features: int, norm: Optional[str], activation: Activation) -> None:
        super().__init__()
        ctor = get_norm_layer(norm, dim=1)
        self.linear = nn.Linear(in_features, out_features, bias=ctor is None)
        self.norm = nn.Identity() if ctor is None else ctor(out_features)
        self.act = ACTIVATIONS[activation]()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(u)))


class MLP(nn.Module):
    """``in -> hidden[0] -> ... -> hidden[-1] -> classes``; hidden layers named ``hidden1``, ``hidden2``, ...

    Weights are drawn from ``N(0, init_std^2)`` and biases start at zero, as the paper's
    "small random Gaussian values". With ``seed`` the weights come from their own generator, drawn
    in the same order whatever the normalization, so networks that differ only in their norm start
    from identical weights (unit k is the same neuron at step 0).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        norm: Optional[str] = "none",
        activation: Activation = "sigmoid",
        init_std: float = 0.1,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"hidden{i}", HiddenLayer(a, b, norm, activation))
        self.out = nn.Linear(sizes[-1], num_classes)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, init_std, generator=gen)
                    if m.bias is not None:
                        m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


def build_mlp(config: "ExperimentConfig", data: "Dataset") -> nn.Module:
    """The fully connected network of ``config``, sized from the data, initialized from the unit's seed."""
    return MLP(data.num_features, config.hidden, data.num_classes, config.norm, config.activation, config.init_std, seed=config.seeds[0])
