"""Experiments from the BatchNorm and ICS literature, one command each (``covshift run NAME``).

Importing this package registers them (the registry imports it on first use), in this order:

* ``santurkar-noise``: Santurkar et al. 2018, section 2.1 -- noisy BN, distribution drift and gradient ICS;
* ``landscape``: Santurkar et al. 2018, section 3.1 -- the loss landscape along the gradient;
* ``lr-sweep``: Bjorck et al. 2018; Ioffe & Szegedy 2015 -- the learning rates BN makes trainable;
* ``depth``: Yang et al. 2019; Daneshmand et al. 2020; Brock et al. 2021 -- deep nets at initialization;
* ``batch-size``: Wu & He 2018; Ioffe 2017 -- small batches, GroupNorm and Batch Renormalization.

The measurements they add are pure functions with their own tests:
:mod:`~covshift.experiments.papers.landscape` and :mod:`~covshift.experiments.papers.gradient_ratio`
(noisy BN is :class:`covshift.nn.NoisyBatchNorm1d`; ranks and signal propagation come from
:mod:`covshift.monitor`).
"""

from covshift.experiments.papers import santurkar_noise  # noqa: F401  (each import registers one experiment)
from covshift.experiments.papers import loss_landscape  # noqa: F401
from covshift.experiments.papers import lr_sweep  # noqa: F401
from covshift.experiments.papers import depth  # noqa: F401
from covshift.experiments.papers import batch_size  # noqa: F401
