"""Options of :class:`~covshift.monitor.ActivationMonitor`, validated once, in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["MonitorConfig", "LayerSpec"]

# What may select layers: a qualified name ("layers.0.act"), a glob ("layers.*.act", "**.bn"),
# a module type (nn.Sigmoid), a predicate (name, module) -> bool, or a sequence mixing them.
LayerSpec = Union[
    None,
    str,
    type,
    Callable[[str, nn.Module], bool],
    Sequence[Union[str, type]],
]

# float32 represents every integer up to 2**24 exactly; histogram counts of a sample are
# moved to the host next to float32 statistics, so a sample may hold at most that many values.
_MAX_SAMPLE = 2**24


def _fail(name: str, expected: str, got: object, fix: str) -> ValueError:
    return ValueError(f"MonitorConfig.{name}: expected {expected}, got {got!r}. {fix}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MonitorConfig:
    """What :class:`~covshift.monitor.ActivationMonitor` records, and how often.

    Every field has a default; override any of them here or as keyword arguments of the monitor
    (``ActivationMonitor(model, every=1)``). Invalid values raise ``ValueError`` at construction.
    """

    every: int = 10
    """Record every ``every`` optimizer steps: steps 0, every, 2*every, ... (step 0 is the first
    forward after attaching, before any update)."""

    layers: LayerSpec = None
    """Which modules to watch. ``None``: every activation-function module (ReLU, Sigmoid, Tanh,
    GELU, ...) and every normalization module (BatchNorm, LayerNorm, GroupNorm, ...). Otherwise a
    module type, a qualified name, a glob over dotted names (``*`` matches inside one name segment,
    ``**`` any number of segments, ``?`` and ``[...]`` as in fnmatch), a predicate
    ``(name, module) -> bool``, or a sequence mixing names, globs and types."""

    point: Literal["input", "output"] = "input"
    """Measure each watched module's input (its first floating-point tensor argument) or its output
    (the output tensor, or the first tensor in a tuple/list/dict output)."""

    percentiles: Tuple[float, ...] = (1.0, 15.0, 50.0, 85.0, 99.0)
    """Percentiles to record, in [0, 100], with linear interpolation (NumPy's default). Named
    ``p1``, ``p15``, ... in the records."""

    hist_bins: int = 64
    """Number of histogram bins inside the fixed range; an underflow and an overflow bin are added."""

    hist_range: Optional[Union[Tuple[float, float], Mapping[str, Tuple[float, float]]]] = None
    """Histogram range ``(lo, hi)`` for every layer, or a mapping from watched layer name to range.
    Layers without a range get one from their first measurement: ``[p1 - pad*w, p99 + pad*w]``
    with ``w = p99 - p1`` and ``pad = hist_pad``. The edges then stay fixed for the whole run, so
    histograms at different steps are comparable; values outside fall in the tail bins."""

    hist_pad: float = 0.5
    """Padding on each side of an automatic histogram range, in units of the first p1..p99 width."""

    saturation_threshold: float = 3.0
    """``frac_saturated`` is the fraction of values with ``|x| > threshold``. At 3.0 a sigmoid is at
    0.953 (slope 0.045, 18% of its maximum) and a tanh at 0.995 (slope 1% of its maximum)."""

    per_channel: bool = False
    """Also record the mean and std of every channel (dim 1) and ``frac_dead``, the fraction of
    channels that are <= 0 for every value in the batch. Costs about three more passes over the
    activation."""

    channels: Optional[Mapping[str, Sequence[int]]] = None
    """Channels (dim 1) of a watched layer whose full statistics (percentiles, mean/std, histogram)
    are also recorded on their own, as extra layers named ``"layer[17]"``. For one unit of a
    ``(N, C)`` activation this is its N values in the batch."""

    record_eval: bool = False
    """Record forwards run while the model is in eval mode (``model.training`` is False)."""

    sample_size: int = 16384
    """Percentiles, histogram counts and the fractions come from at most this many values of each
    activation: all of them when the tensor is no larger (then exact), else a fixed uniformly
    random subset of positions, drawn once per tensor size. Mean, std, min and max always use
    every value."""

    flush_every: int = 16
    """Recorded steps kept on the device before their results are moved to the host (and written)
    in one batch."""

    histogram_write_interval: float = 30.0
    """Seconds between rewrites of the histogram npz file by automatic flushes; an explicit
    ``flush()`` or leaving the ``with`` block always writes it."""

    probe_mode: Literal["eval", "train"] = "eval"
    """Mode of the forward on the fixed probe batch. ``"eval"`` uses running statistics; ``"train"``
    uses batch statistics, and the model's buffers and the RNG are restored afterwards."""

    seed: int = 0
    """Seed of the private generator that draws sample positions (the global RNG is not used)."""

    reduce: Literal["rank", "global"] = "rank"
    """Under ``torch.distributed``: ``"rank"`` (default) records each process's own shard, with no
    communication; ``"global"`` merges every record across the ranks of the process group at each
    flush (one collective per flush: exact counts, mean, variance, min, max and histograms;
    percentiles from the ranks' samples pooled), and only rank 0 writes files."""

    def __post_init__(self) -> None:
        for name in ("every", "hist_bins", "flush_every", "sample_size", "seed"):
            v = getattr(self, name)
            if not _is_int(v):
                raise _fail(name, "an int", v, f"Pass a whole number, e.g. {name}=10.")
        if self.every < 1:
            raise _fail("every", "an int >= 1", self.every, "Use every=1 to record every step.")
        if self.hist_bins < 1:
            raise _fail("hist_bins", "an int >= 1", self.hist_bins, "Use e.g. hist_bins=64.")
        if self.flush_every < 1:
            raise _fail("flush_every", "an int >= 1", self.flush_every, "Use e.g. flush_every=16.")
        if not 2 <= self.sample_size <= _MAX_SAMPLE:
            raise _fail(
                "sample_size", f"an int in [2, {_MAX_SAMPLE}]", self.sample_size,
                "Use e.g. sample_size=16384.",
            )
        if self.point not in ("input", "output"):
            raise _fail("point", "'input' or 'output'", self.point, "Pick one of the two.")
        if self.reduce not in ("rank", "global"):
            raise _fail(
                "reduce", "'rank' or 'global'", self.reduce,
                "Use reduce='global' to merge statistics across torch.distributed ranks.",
            )
        if self.probe_mode not in ("eval", "train"):
            raise _fail("probe_mode", "'eval' or 'train'", self.probe_mode, "Pick one of the two.")

        try:
            pct = tuple(float(q) for q in self.percentiles)
        except (TypeError, ValueError):
            raise _fail(
                "percentiles", "a sequence of numbers in [0, 100]", self.percentiles,
                "Use e.g. percentiles=(15, 50, 85).",
            ) from None
        if not pct or any(not 0.0 <= q <= 100.0 for q in pct) or len(set(pct)) != len(pct):
            raise _fail(
                "percentiles", "a non-empty sequence of distinct numbers in [0, 100]",
                self.percentiles, "Use e.g. percentiles=(1, 15, 50, 85, 99).",
            )
        object.__setattr__(self, "percentiles", pct)

        for name in ("hist_pad", "saturation_threshold", "histogram_write_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _fail(name, "a finite number >= 0", v, f"Use e.g. {name}={_DEFAULTS[name]}.")
        if self.saturation_threshold == 0:
            raise _fail(
                "saturation_threshold", "a number > 0", 0, "Use e.g. saturation_threshold=3.0."
            )

        if self.hist_range is not None:
            ranges = self.hist_range.values() if isinstance(self.hist_range, Mapping) else [self.hist_range]
            for r in ranges:
                ok = isinstance(r, (tuple, list)) and len(r) == 2
                ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in r)
                if not ok or not r[0] < r[1]:
                    raise _fail(
                        "hist_range", "(lo, hi) with finite lo < hi, or a mapping of layer name "
                        "to such pairs", self.hist_range, "Use e.g. hist_range=(-6.0, 6.0).",
                    )

        if self.channels is not None:
            ok = isinstance(self.channels, Mapping) and all(
                isinstance(k, str)
                and isinstance(v, Sequence)
                and len(v) > 0
                and all(_is_int(i) and i >= 0 for i in v)
                for k, v in self.channels.items()
            )
            if not ok:
                raise _fail(
                    "channels", "a mapping of layer name to a non-empty list of channel "
                    "indices >= 0", self.channels, "Use e.g. channels={'layers.2.act': [17]}.",
                )
            object.__setattr__(
                self, "channels", {k: tuple(dict.fromkeys(v)) for k, v in self.channels.items()}
            )

        if isinstance(self.layers, (list, tuple)):
            for item in self.layers:
                if not isinstance(item, (str, type)):
                    raise _fail(
                        "layers", "a name, glob, module type, predicate, or a sequence of names, "
                        "globs and types", self.layers, "Use e.g. layers=['fc1', nn.Sigmoid].",
                    )
            object.__setattr__(self, "layers", tuple(self.layers))
        elif not (self.layers is None or isinstance(self.layers, (str, type)) or callable(self.layers)):
            raise _fail(
                "layers", "None, a name, glob, module type, predicate, or a sequence of them",
                self.layers, "Use e.g. layers='layers.*.act'.",
            )

    def to_dict(self) -> dict:
        """A JSON-ready description (types and predicates by name), as saved in ``meta.json``."""
        d = asdict(self)

        def describe(v: object) -> object:
            if isinstance(v, type):
                return f"{v.__module__}.{v.__qualname__}"
            if callable(v):
                return getattr(v, "__qualname__", repr(v))
            return v

        layers = self.layers
        d["layers"] = [describe(v) for v in layers] if isinstance(layers, tuple) else describe(layers)
        if isinstance(self.hist_range, Mapping):
            d["hist_range"] = {k: list(v) for k, v in self.hist_range.items()}
        if self.channels is not None:
            d["channels"] = {k: list(v) for k, v in self.channels.items()}
        return d


_DEFAULTS = {f.name: f.default for f in MonitorConfig.__dataclass_fields__.values()}  # type: ignore[attr-defined]
