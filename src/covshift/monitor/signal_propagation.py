r"""Signal propagation of any model: how activations scale, and whether samples stay distinct, with depth.

:func:`signal_propagation` runs one forward of ``model`` on ``inputs`` and measures the output of each
*block* (Brock, De & Smith 2021, "signal propagation plots"; Daneshmand et al. 2020; Lubana et al.
2021). For a block output :math:`y` with channel axis :math:`c` (``C`` channels, :math:`M` values per
channel: the batch times every other axis), and :math:`Y \in \mathbb{R}^{N \times D}` the same output
with one row per sample:

* ``channel_sq_mean`` :math:`= \frac1C \sum_c \mu_c^2`, with :math:`\mu_c = \frac1M \sum y_{\cdot c}`
  (the average channel squared mean);
* ``channel_var`` :math:`= \frac1C \sum_c \frac1M \sum (y_{\cdot c} - \mu_c)^2` (the average channel
  variance, population);
* ``residual_var``: ``channel_var`` of the block's *residual branch*, the operand :math:`f(x)` of the
  block's skip addition :math:`\text{skip}(x) + f(x)`, measured as that operand itself, before the
  addition and before anything the block does after it (a final ReLU, say); NaN for a block without
  a skip. (timm's ``extract_spp_stats`` reports the channel variance of the block output here.)
* ``numerical_rank`` of :math:`Y` (:func:`numerical_rank`) and ``stable_rank``
  :math:`\|Y\|_F^2 / \|Y\|_2^2` (:func:`stable_rank`), over the batch (Daneshmand et al. 2020: without
  normalization the rank of the representation collapses with depth);
* ``cosine_similarity``: the mean of :math:`\cos(Y_i, Y_j)` over pairs :math:`i \ne j` of samples with
  nonzero rows (Lubana et al. 2021: near 1 means the samples have become indistinguishable). The rows
  are not centered, as in those papers.

Everything is computed in float64 (float32 on MPS) on the activation's device. The rank and similarity
measures are :mod:`covshift.monitor.rank`; the search for residual blocks is :mod:`covshift.monitor.blocks`.

**Blocks.** ``blocks=`` names them (names, globs or types, as ``MonitorConfig.layers``). By default
they are the *residual blocks* of the model, found by running one forward: a module (not the model
itself) is residual when its own ``forward`` adds (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``)
two different tensors of the same shape, one of which is a *skip*: the module's input tensor itself,
or a tensor its forward computed from that input through its direct children and torch functions
(a projection shortcut such as torchvision's ``downsample(x)``, or a pre-activation block's
``downsample(relu(norm1(x)))``). The chain's length counts the child calls (functions count 0); the
skip is the input itself if it is an operand, else the operand with the shorter chain, and the
other operand, longer or computed otherwise, is the residual branch (equal chains: the skip is the
output of the child with fewer parameters). The first such
addition in the module's forward counts. Only the outermost residual modules are kept. A model with
no residual module falls back to the children of its longest ``nn.Sequential``. Depth is the order
in which the blocks are first called.

**Channel axis.** ``channel_axis="auto"``: axis 1 for ``(N, C)`` and ``(N, C, *)`` outputs of 2 or at
least 4 dims (a ``channels_last`` tensor keeps its logical ``(N, C, H, W)`` shape, so axis 1 there
too); for 3-dim outputs, ``(N, C, L)`` when the block contains only channel-first layers (Conv1d,
BatchNorm1d, GroupNorm, ...) and ``(N, L, C)`` (axis -1) when it contains only feature-last layers
(Linear, LayerNorm, MultiheadAttention, ...); otherwise it raises and asks for ``channel_axis=``.

**Side effects: none.** The forward runs under ``torch.no_grad()`` with every ActivationMonitor
suspended; every hook is removed, the modules' train/eval flags, the buffers (BatchNorm's running
statistics) and the CPU/CUDA RNG are restored afterwards, even on error.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from covshift._io import atomic_write_bytes
from covshift.monitor.blocks import _as_args, _Frame, _tracking, _untouched, find_blocks
from covshift.monitor.hooks import eager
from covshift.monitor.rank import (  # noqa: F401 - singular_values, mean_cosine_similarity: re-exported
    _as_matrix,
    _compute_dtype,
    _rank_from,
    _stable_from,
    mean_cosine_similarity,
    numerical_rank,
    singular_values,
    stable_rank,
)
from covshift.monitor.config import LayerSpec
from covshift.monitor.selection import select_modules

__all__ = [
    "SignalPropagation",
    "STATISTICS",
    "Statistic",
    "signal_propagation",
    "numerical_rank",
    "stable_rank",
    "singular_values",
    "mean_cosine_similarity",
    "plot_signal_propagation",
    "find_blocks",
]

Statistic = Literal[
    "channel_sq_mean", "channel_var", "residual_var", "numerical_rank", "stable_rank", "cosine_similarity"
]
STATISTICS: tuple[str, ...] = (
    "channel_sq_mean", "channel_var", "residual_var", "numerical_rank", "stable_rank", "cosine_similarity",
)


# -- the result --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SignalPropagation:
    """Statistics of each block's output, in depth order (see the module docstring for definitions).

    Every statistic is a ``(B,)`` array, one entry per block; ``residual_var`` is NaN for blocks
    without a skip (``residual`` False).
    """

    label: str  # the model's name in plots and files
    blocks: tuple[str, ...]  # qualified module names, in the order the forward first calls them
    shapes: tuple[tuple[int, ...], ...]  # each block's output shape
    channel_axes: tuple[int, ...]  # the channel axis used for each block, non-negative
    residual: np.ndarray  # (B,) bool: the block has a skip addition
    channel_sq_mean: np.ndarray  # (B,) float64
    channel_var: np.ndarray  # (B,) float64
    residual_var: np.ndarray  # (B,) float64, NaN where not residual
    numerical_rank: np.ndarray  # (B,) int64
    stable_rank: np.ndarray  # (B,) float64
    cosine_similarity: np.ndarray  # (B,) float64
    batch_size: int
    training: bool  # the mode the forward ran in

    @property
    def depth(self) -> np.ndarray:
        """``(B,)`` 1, 2, ..., B: the x-axis of a signal propagation plot."""
        return np.arange(1, len(self.blocks) + 1)

    def statistic(self, name: Statistic) -> np.ndarray:
        """The ``(B,)`` array of one statistic, by name (one of :data:`STATISTICS`)."""
        if name not in STATISTICS:
            raise ValueError(f"statistic: expected one of {STATISTICS}, got {name!r}.")
        return getattr(self, name)

    def table(self) -> list[dict]:
        """Tidy rows ``{"label", "depth", "block", "stat", "value"}``."""
        return [
            {"label": self.label, "depth": d, "block": b, "stat": s, "value": float(getattr(self, s)[i])}
            for i, (d, b) in enumerate(zip(self.depth.tolist(), self.blocks))
            for s in STATISTICS
        ]

    def save_npz(self, path: Union[str, Path]) -> None:
        """Write every field to an ``.npz`` file atomically; :meth:`load_npz` reads it back."""
        buf = io.BytesIO()
        np.savez(
            buf,
            label=np.asarray(self.label),
            blocks=np.asarray(self.blocks, dtype=str),
            shapes=np.asarray([",".join(map(str, s)) for s in self.shapes], dtype=str),
            channel_axes=np.asarray(self.channel_axes, dtype=np.int64),
            residual=self.residual,
            batch_size=np.asarray(self.batch_size),
            training=np.asarray(self.training),
            **{s: getattr(self, s) for s in STATISTICS},
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load_npz(cls, path: Union[str, Path]) -> "SignalPropagation":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                label=str(z["label"]),
                blocks=tuple(str(b) for b in z["blocks"]),
                shapes=tuple(tuple(int(v) for v in s.split(",") if v) for s in z["shapes"].tolist()),
                channel_axes=tuple(int(a) for a in z["channel_axes"]),
                residual=z["residual"].astype(bool),
                batch_size=int(z["batch_size"]),
                training=bool(z["training"]),
                **{s: z[s] for s in STATISTICS},
            )

    def write_tensorboard(self, log_dir: Union[str, Path], step: Optional[int] = None) -> None:
        """TensorBoard scalars: ``signal_propagation/<stat>`` against depth (``step=None``: the
        x-axis is the depth, one run directory per model draws a signal propagation plot), or
        ``signal_propagation/<stat>/<block>`` at ``global_step=step`` (to follow blocks over training)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency
            raise ImportError(
                "write_tensorboard needs the tensorboard package, which is not installed. "
                "Install it with: pip install 'covshift[tensorboard]'."
            ) from e
        w = SummaryWriter(log_dir=str(log_dir))
        try:
            for s in STATISTICS:
                values = getattr(self, s)
                for i, (d, b) in enumerate(zip(self.depth.tolist(), self.blocks)):
                    if step is None:
                        w.add_scalar(f"signal_propagation/{s}", float(values[i]), global_step=d)
                    else:
                        w.add_scalar(f"signal_propagation/{s}/{b}", float(values[i]), global_step=step)
        finally:
            w.close()


# -- channel axis ------------------------------------------------------------------------------------
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                  nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_CHANNEL_LAST = tuple(t for t in (nn.Linear, nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.MultiheadAttention,
                                  nn.Embedding) if t is not None)


def _channel_axis(name: str, module: nn.Module, y: Tensor, spec: Union[int, str, Mapping[str, int]]) -> int:
    if isinstance(spec, Mapping):
        spec = spec.get(name, "auto")
    if y.dim() < 2:
        raise ValueError(
            f"block {name!r}: expected an output of shape (N, C, ...) with a batch axis, got shape "
            f"{tuple(y.shape)}. Choose blocks whose output keeps the batch (blocks=...)."
        )
    if spec != "auto":
        if not isinstance(spec, int) or not -y.dim() < spec < y.dim() or spec % y.dim() == 0:
            raise ValueError(
                f"channel_axis: expected 'auto' or an axis in 1..{y.dim() - 1} (or negative) of block "
                f"{name!r}'s output of shape {tuple(y.shape)}, got {spec!r}. Axis 0 is the batch."
            )
        return spec % y.dim()
    if y.dim() != 3:
        return 1
    mods = list(module.modules())
    first = any(isinstance(m, _CHANNEL_FIRST) for m in mods)
    last = any(isinstance(m, _CHANNEL_LAST) for m in mods)
    if first != last:
        return 1 if first else 2
    raise ValueError(
        f"channel_axis: cannot tell (N, C, L) from (N, L, C) for block {name!r} with output shape "
        f"{tuple(y.shape)} (it contains {'both channel-first and feature-last' if first else 'neither channel-first nor feature-last'} "
        "layers). Pass channel_axis=1 or channel_axis=-1 (or a mapping from block name to axis)."
    )


def _channel_moments(y: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Average over channels of the squared channel mean and of the population channel variance."""
    y = y.detach().to(_compute_dtype(y)).movedim(axis, -1).reshape(-1, y.shape[axis])  # (M, C)
    mu = y.mean(0)  # (C,)
    var = (y - mu).square().mean(0)  # (C,), two-pass
    return mu.square().mean(), var.mean()


# -- the instrument ----------------------------------------------------------------------------------
def signal_propagation(
    model: nn.Module,
    inputs: Any,
    blocks: LayerSpec = None,
    *,
    channel_axis: Union[int, Literal["auto"], Mapping[str, int]] = "auto",
    training: Optional[bool] = None,
    rtol: Optional[float] = None,
    label: Optional[str] = None,
) -> SignalPropagation:
    """Signal propagation statistics of each block of ``model`` on one batch (module docstring).

    Args:
        model: any ``nn.Module``, at initialization or at any point of training.
        inputs: the batch: a tensor, or a tuple of positional arguments. Brock et al. use N(0, 1)
            inputs at initialization, e.g. ``torch.randn(64, 3, 32, 32)``.
        blocks: which modules are blocks (names, globs, types or a predicate, as
            ``MonitorConfig.layers``); default :func:`find_blocks`.
        channel_axis: ``"auto"``, one axis for every block, or ``{block name: axis}``.
        training: run the forward in training mode (True: BatchNorm uses batch statistics, as in
            Brock et al.'s plots at initialization) or eval mode (False); default the model's
            current mode. The modes and buffers are restored afterwards.
        rtol: relative tolerance of :func:`numerical_rank` (default ``max(N, D) * eps`` of the
            activation's dtype).
        label: the model's name in plots and files; default its class name.

    Returns:
        a :class:`SignalPropagation`, blocks in the order the forward first calls them.

    Raises:
        ValueError: a block name that matches nothing, a block that was never called or returned no
            floating-point tensor, or an ambiguous channel axis.
    """
    args = _as_args(inputs)
    modules = dict(model.named_modules())
    names = find_blocks(model, inputs, training=training) if blocks is None else select_modules(
        model, blocks, default=lambda n, m: False
    )
    chosen = set(names)
    found: dict[str, dict[str, Any]] = {}  # block -> its measurements, in call order
    branches: dict[str, Tensor] = {}  # block -> its residual branch (first call), until its output

    def on_skip(frame: _Frame, branch: Tensor) -> None:
        if frame.name in chosen and frame.name not in found and frame.name not in branches:
            branches[frame.name] = branch.detach().clone()  # a copy: `out += skip` overwrites it

    def on_output(frame: _Frame, out: Optional[Tensor]) -> None:
        if frame.name not in chosen or frame.name in found:
            return
        if out is None:
            raise ValueError(
                f"block {frame.name!r}: expected a floating-point tensor output, got none. Choose "
                "blocks that return a tensor (blocks=...)."
            )
        axis = _channel_axis(frame.name, modules[frame.name], out, channel_axis)
        rec = {"axis": axis, "shape": tuple(out.shape), "moments": _channel_moments(out, axis)}
        m = _as_matrix(out, "signal_propagation")  # (N, D), one SVD serves both ranks
        sv = singular_values(m) if m.numel() else m.new_zeros(0)
        rec["rank"] = _rank_from(sv, tuple(m.shape), out.dtype, None, rtol)
        rec["stable"] = _stable_from(sv)
        rec["cos"] = mean_cosine_similarity(m)
        branch = branches.pop(frame.name, None)
        # the branch has the shape of the sum; a block that reshapes after the addition is measured
        # on the branch's own channel axis
        rec["residual"] = None if branch is None else _channel_moments(
            branch, axis if branch.shape == out.shape else _channel_axis(frame.name, modules[frame.name], branch, channel_axis)
        )[1]
        found[frame.name] = rec

    with _untouched(model, training), eager(model):  # a compiled graph would not call the tracking hooks
        mode = model.training
        with _tracking(model, on_skip, on_output):
            model(*args)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"blocks: expected every block to be called by the forward, got {missing} never called. "
            "Drop them from blocks=."
        )
    order = list(found)
    recs = [found[n] for n in order]
    return SignalPropagation(
        label=label or type(model).__name__,
        blocks=tuple(order),
        shapes=tuple(r["shape"] for r in recs),
        channel_axes=tuple(r["axis"] for r in recs),
        residual=np.array([r["residual"] is not None for r in recs], dtype=bool),
        channel_sq_mean=np.array([float(r["moments"][0]) for r in recs], dtype=np.float64),
        channel_var=np.array([float(r["moments"][1]) for r in recs], dtype=np.float64),
        residual_var=np.array([np.nan if r["residual"] is None else float(r["residual"]) for r in recs]),
        numerical_rank=np.array([r["rank"] for r in recs], dtype=np.int64),
        stable_rank=np.array([r["stable"] for r in recs], dtype=np.float64),
        cosine_similarity=np.array([r["cos"] for r in recs], dtype=np.float64),
        batch_size=int(args[0].shape[0]) if args and isinstance(args[0], Tensor) and args[0].dim() else 0,
        training=bool(mode),
    )


# -- the figure --------------------------------------------------------------------------------------
_TITLES = {
    "channel_sq_mean": "avg. channel squared mean",
    "channel_var": "avg. channel variance",
    "residual_var": "residual branch variance",
    "numerical_rank": "numerical rank (batch)",
    "stable_rank": "stable rank (batch)",
    "cosine_similarity": "mean inter-sample cosine",
}


def plot_signal_propagation(
    results: Union[SignalPropagation, Sequence[SignalPropagation]],
    stats: Sequence[Statistic] = ("channel_sq_mean", "channel_var", "residual_var"),
    *,
    log_y: Optional[Sequence[bool]] = None,
    ncols: Optional[int] = None,
):
    """A signal propagation plot: one panel per statistic against depth, one line per model.

    Args:
        results: one or more :class:`SignalPropagation` (their ``label`` names the lines).
        stats: the statistics to draw, one panel each.
        log_y: per panel, a log y-axis; default log for the variances and squared means.
        ncols: panels per row (default all in one row).

    Returns:
        a ``matplotlib.figure.Figure`` (not attached to pyplot: save it with ``fig.savefig``).
    """
    from matplotlib.figure import Figure

    runs = [results] if isinstance(results, SignalPropagation) else list(results)
    if not runs:
        raise ValueError("results: expected at least one SignalPropagation, got none.")
    for s in stats:
        if s not in STATISTICS:
            raise ValueError(f"stats: expected names from {STATISTICS}, got {s!r}.")
    logs = list(log_y) if log_y is not None else [s in ("channel_sq_mean", "channel_var", "residual_var") for s in stats]
    cols = len(stats) if ncols is None else max(1, min(int(ncols), len(stats)))
    rows = -(-len(stats) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.reshape(-1))
    for ax in axes[len(stats):]:
        ax.remove()
    for ax, s, log in zip(axes, stats, logs):
        for r in runs:
            v = r.statistic(s).astype(np.float64)
            ax.plot(r.depth, v, marker="o", markersize=3, label=r.label)
        if log:
            ax.set_yscale("log")
        ax.set_title(_TITLES[s], fontsize=10)
        ax.set_xlabel("block (depth)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig
