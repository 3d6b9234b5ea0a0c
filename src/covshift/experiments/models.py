"""Networks for the experiments: a fully connected net with optional normalization before each nonlinearity."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

import covshift.nn as cnn

__all__ = ["MLP", "Norm", "Activation", "NORMS", "ACTIVATIONS"]

Norm = Literal["none", "bn"]
Activation = Literal["sigmoid", "tanh", "relu"]
NORMS = ("none", "bn")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class HiddenLayer(nn.Module):
    """``act(norm(W u))`` (Ioffe & Szegedy's placement), or ``act(W u + b)`` without normalization.

    With BN the linear layer's own bias is dropped: BN's ``beta`` takes its role.
    """

    def __init__(self, in_features: int, out_features: int, norm: Norm, activation: Activation) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=norm == "none")
        self.norm = cnn.BatchNorm1d(out_features) if norm == "bn" else nn.Identity()
        self.act = ACTIVATIONS[activation]()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(u)))


class MLP(nn.Module):
    """``in -> hidden[0] -> ... -> hidden[-1] -> classes``; hidden layers named ``hidden1``, ``hidden2``, ...

    Weights are drawn from ``N(0, init_std^2)`` and biases start at zero, as the paper's
    "small random Gaussian values".
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        norm: Norm = "none",
        activation: Activation = "sigmoid",
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"hidden{i}", HiddenLayer(a, b, norm, activation))
        self.out = nn.Linear(sizes[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x
