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

Everything is computed in float64 (float32 on MPS) on the activation's device.

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

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from covshift._io import atomic_write_bytes
from covshift.monitor.activations import _cuda_devices, _first_float_tensor, suspend_monitors
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


# -- rank and similarity of a (N, D) matrix ------------------------------------------------------------
def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _as_matrix(a: Tensor, name: str) -> Tensor:
    if a.dim() < 2:
        raise ValueError(
            f"{name}: expected a matrix (N, D) or a batch (N, *) of at least 2 dims, got shape "
            f"{tuple(a.shape)}. Pass one row per sample."
        )
    return a.detach().reshape(a.shape[0], -1).to(_compute_dtype(a))


def singular_values(m: Tensor) -> Tensor:
    """Singular values of a matrix, descending; a wide (or tall) matrix is first reduced to its
    square triangular factor by a QR of its tall orientation, which has the same singular values and
    is backward stable (no Gram matrix, so nothing is squared), and much faster than an SVD of a
    64 x 65536 batch."""
    n, d = m.shape
    if max(n, d) > 2 * min(n, d):
        m = torch.linalg.qr(m.T if d > n else m, mode="r").R
    return torch.linalg.svdvals(m)


def _rank_from(s: Tensor, shape: tuple, dtype: torch.dtype, atol: Optional[float], rtol: Optional[float]) -> int:
    if s.numel() == 0:
        return 0
    if rtol is None:
        rtol = 0.0 if atol is not None else max(shape) * torch.finfo(dtype).eps
    tau = max(float(atol or 0.0), float(rtol) * float(s[0]))
    return int((s > tau).sum())


def _stable_from(s: Tensor) -> float:
    top = float(s[0]) if s.numel() else 0.0
    return 0.0 if top == 0.0 else float((s * s).sum()) / top**2


def numerical_rank(
    a: Tensor, *, atol: Optional[float] = None, rtol: Optional[float] = None, eps_dtype: Optional[torch.dtype] = None
) -> int:
    r"""The number of singular values of ``a`` above a tolerance: :math:`\#\{i : \sigma_i > \tau\}`.

    ``a`` is ``(N, D)``, or ``(N, *)`` flattened to one row per sample. The tolerance is
    :math:`\tau = \max(\text{atol},\ \text{rtol} \cdot \sigma_{\max})`, with the defaults of
    ``torch.linalg.matrix_rank`` / ``numpy.linalg.matrix_rank``: ``atol = 0`` and, when neither is
    given, ``rtol = max(N, D) * eps``, where ``eps`` is the machine epsilon of ``eps_dtype`` (default
    ``a.dtype``: the precision the values were computed in, so that rounding noise of a float32
    activation does not count as rank). The singular values are computed in float64.
    """
    m = _as_matrix(a, "numerical_rank")
    if m.numel() == 0:
        return 0
    dtype = eps_dtype or (a.dtype if a.is_floating_point() else torch.float32)
    return _rank_from(singular_values(m), tuple(m.shape), dtype, atol, rtol)


def stable_rank(a: Tensor) -> float:
    r"""Stable rank :math:`\|A\|_F^2 / \|A\|_2^2 = \sum_i \sigma_i^2 / \sigma_{\max}^2` of ``a``.

    ``a`` is ``(N, D)`` or ``(N, *)`` (one row per sample). It lies in :math:`[1, \operatorname{rank} A]`,
    and, unlike the numerical rank, needs no threshold. A zero matrix has stable rank 0.
    """
    m = _as_matrix(a, "stable_rank")
    return 0.0 if m.numel() == 0 else _stable_from(singular_values(m))


def mean_cosine_similarity(a: Tensor) -> float:
    r"""Mean of :math:`\cos(a_i, a_j)` over pairs :math:`i \ne j` of the nonzero rows of ``a`` (N, *).

    NaN when fewer than two rows are nonzero (the cosine is undefined).
    """
    m = _as_matrix(a, "mean_cosine_similarity")
    norms = torch.linalg.vector_norm(m, dim=1)
    m = m[norms > 0] / norms[norms > 0, None]
    k = m.shape[0]
    if k < 2:
        return float("nan")
    total = torch.linalg.vector_norm(m.sum(0)) ** 2  # sum over all ordered pairs, diagonal included
    return float((total - k) / (k * (k - 1)))


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


# -- finding skip additions --------------------------------------------------------------------------
_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.add_)


@dataclasses.dataclass
class _Frame:
    name: str
    module: nn.Module
    input: Optional[Tensor]
    # tensors made by chains of direct children from `input`: id -> (calls from input, last child);
    # `keep` holds them so that their ids stay unique while the module runs
    depth: dict = dataclasses.field(default_factory=dict)
    keep: list = dataclasses.field(default_factory=list)
    skip_found: bool = False


class _SkipFinder(TorchFunctionMode):
    """Attributes every addition to the innermost module running and reports skip additions.

    ``on_skip(frame, branch)`` is called before the addition runs (an in-place ``out += identity``
    would overwrite the branch), once per module call, for the first skip addition.
    """

    def __init__(self, on_skip) -> None:
        super().__init__()
        self.stack: list[_Frame] = []
        self.on_skip = on_skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and len(args) >= 2 and self.stack:
            frame = self.stack[-1]
            a, b = args[0], args[1]
            if not frame.skip_found and isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape:
                branch = _branch_operand(frame, a, b)
                if branch is not None:
                    frame.skip_found = True
                    alpha = kwargs.get("alpha", 1)
                    self.on_skip(frame, branch if alpha == 1 else branch * alpha)
        out = func(*args, **kwargs)
        if self.stack and self.stack[-1].input is not None and isinstance(out, Tensor):
            # a function of tracked tensors, run by this module's own forward: as far from the input
            # as its nearest tracked argument (functions are not counted, only child calls)
            frame = self.stack[-1]
            ds = [d for d in (_depth(frame, t) for t in args if isinstance(t, Tensor)) if d is not None]
            if ds and out is not frame.input and id(out) not in frame.depth:
                frame.depth[id(out)] = min(ds, key=lambda d: d[0])
                frame.keep.append(out)
        return out


def _branch_operand(frame: _Frame, a: Tensor, b: Tensor) -> Optional[Tensor]:
    """The residual branch of ``a + b`` run by ``frame``'s module, or None if it is no skip addition.

    The skip is the operand reached from the module's input through the fewest direct-child calls
    (0: the input itself); the branch is the other one, which must be deeper or not reached that
    way (a functional op broke the chain). Equal depths: the skip is the output of the child with
    fewer parameters (a projection is smaller than the branch it bypasses).
    """
    if frame.input is None or frame.module is None or a is b:
        return None
    if a is frame.input or b is frame.input:  # the identity skip, whatever the branch's chain
        return b if a is frame.input else a
    da, db = _depth(frame, a), _depth(frame, b)
    if da is None and db is None:
        return None
    if db is None or (da is not None and da[0] < db[0]):
        return b
    if da is None or db[0] < da[0]:
        return a
    if da[1] is None or db[1] is None or da[1] is db[1]:
        return None
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return b if size(da[1]) <= size(db[1]) else a


def _depth(frame: _Frame, t: Tensor) -> Optional[tuple[int, Optional[nn.Module]]]:
    return (0, None) if t is frame.input else frame.depth.get(id(t))


@contextlib.contextmanager
def _tracking(model: nn.Module, on_skip, on_output, on_call=None) -> Iterator[_SkipFinder]:
    """Hooks on every module (a call stack, children fed the caller's input, outputs) and the
    skip finder; all removed on exit, even on error."""
    finder = _SkipFinder(on_skip)
    handles = []
    root = model

    def pre(name: str, module: nn.Module, args: tuple) -> None:
        finder.stack.append(_Frame(name, None if module is root else module, _first_float_tensor(args)))
        if on_call is not None:
            on_call(name)

    def post(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not finder.stack or finder.stack[-1].name != name:
            return  # an error unwound the stack; the forward is failing anyway
        frame = finder.stack.pop()
        out = _first_float_tensor(output)
        if finder.stack and out is not None and frame.input is not None:
            parent = finder.stack[-1]  # the caller: record how far `out` is from its input
            d = _depth(parent, frame.input) if parent.input is not None else None
            if d is not None and id(out) not in parent.depth and out is not parent.input:
                parent.depth[id(out)] = (d[0] + 1, module)
                parent.keep.append(out)
        on_output(frame, out)

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a, _n=name: pre(_n, mod, a)))
            handles.append(m.register_forward_hook(lambda mod, a, o, _n=name: post(_n, mod, a, o), always_call=True))
        with finder:
            yield finder
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _untouched(model: nn.Module, training: Optional[bool]) -> Iterator[None]:
    """No grad, monitors suspended; modes, buffers and the RNG restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), suspend_monitors(), torch.random.fork_rng(devices=_cuda_devices(model)):
            if training is not None:
                model.train(training)
            yield
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def find_blocks(model: nn.Module, inputs: Any, *, training: Optional[bool] = None) -> list[str]:
    """The default blocks of :func:`signal_propagation` (rule in the module docstring), in call order.

    Raises:
        ValueError: the model has no residual module and no ``nn.Sequential`` with children.
    """
    residual: list[str] = []
    called: list[str] = []

    def on_skip(frame: _Frame, branch: Tensor) -> None:
        if frame.name not in residual:
            residual.append(frame.name)

    def on_call(name: str) -> None:
        if name not in called:
            called.append(name)

    with _untouched(model, training):
        with _tracking(model, on_skip, lambda frame, out: None, on_call):
            model(*_as_args(inputs))
    outer = [n for n in residual if n and not any(_is_ancestor(o, n) for o in residual if o != n)]
    if outer:
        return sorted(outer, key=called.index)
    seqs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential) and len(m) > 0]
    if not seqs:
        raise ValueError(
            f"blocks: found no residual block (a module whose forward adds a skip) and no nn.Sequential "
            f"in this {type(model).__name__}. Pass blocks= with the module names to measure."
        )
    name, seq = max(seqs, key=lambda nm: len(nm[1]))
    prefix = f"{name}." if name else ""
    return [f"{prefix}{child}" for child, _ in seq.named_children()]


def _is_ancestor(a: str, b: str) -> bool:
    return a == "" or b.startswith(a + ".")


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

    with _untouched(model, training):
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
