"""ActivationMonitor: records the distribution of chosen activations while any model trains.

Usage::

    mon = ActivationMonitor(model, every=10, log_dir="runs/mlp")
    with mon:                       # attach hooks; on exit: flush, detach, close files
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step()              # once per optimizer step
    steps, p50 = mon.series("layers.2.act", "p50")

How it records. Step ``t`` counts calls to :meth:`ActivationMonitor.step`; when ``t % every == 0``
the monitor is *armed*, and the first forward of ``model`` that follows (in training mode, unless
``record_eval``) is measured: every watched module's input (or output) is reduced on its device by
:func:`covshift.monitor.stats.reduce`, inside the hook. Later forwards in the same step (gradient
accumulation, evaluation) are not recorded. Results wait on the device and move to the host in one
batch every ``flush_every`` recorded steps, when :meth:`~ActivationMonitor.flush` is called, when a
view (``table``, ``series``, ...) is read, or on leaving the ``with`` block.

Hooks exist only during armed steps: :meth:`~ActivationMonitor.step` registers them when it arms a
checkpoint and removes them at the next call, so the steps in between cost nothing.

A module called several times in one forward (shared weights, one activation module reused) is
recorded per call: ``"act"``, ``"act#1"``, ``"act#2"``, ... Only modules are seen: an activation
called as a function (``torch.sigmoid`` inside ``forward``) is watched through the module before it
with ``point="output"``. Statistics are per process: under data parallelism each rank measures its
own shard and nothing is reduced across ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from covshift.monitor import io, stats
from covshift.monitor.config import MonitorConfig
from covshift.monitor.records import ChannelStats, Histograms, MonitorRecords
from covshift.monitor.selection import select_modules

__all__ = ["ActivationMonitor", "suspend_monitors"]

_SUSPENDED: contextvars.ContextVar[int] = contextvars.ContextVar("covshift_monitor_suspended", default=0)


@contextlib.contextmanager
def suspend_monitors() -> Iterator[None]:
    """Forwards run inside this block are recorded by no :class:`ActivationMonitor`.

    :func:`covshift.monitor.gradient_ics` uses it for its extra forwards; use it for your own
    extra forwards (a validation pass in training mode, say) during an armed step.
    """
    token = _SUSPENDED.set(_SUSPENDED.get() + 1)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def _first_float_tensor(obj: Any) -> Optional[Tensor]:
    """The first floating-point tensor in ``obj``, depth-first through tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        items = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    else:
        return None
    for item in items:
        t = _first_float_tensor(item)
        if t is not None:
            return t
    return None


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    # The flush runs many small ops on (R, n) samples. Split over intra-op threads they gain
    # nothing, and on a busy machine each one waits for a descheduled worker (we measured the
    # MLP's every=1 overhead going from ~40% to ~460% with 2 threads under load). The setting
    # is OpenMP's per-calling-thread one; it is restored on exit.
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


class ActivationMonitor:
    """Watches activations of ``model`` while the user's loop trains it.

    Args:
        model: any ``nn.Module``. Its first forward after each checkpoint step is measured.
        config: a :class:`MonitorConfig`; keyword ``overrides`` replace its fields.
        log_dir: a directory for ``monitor.jsonl``, ``histograms.npz`` and ``meta.json``
            (see :mod:`covshift.monitor.io`); ``None`` keeps everything in memory.
        probe: a fixed batch (a tensor, or a tuple of positional arguments) on the model's device.
            At every checkpoint it is run through the model under ``torch.no_grad()`` (in
            ``config.probe_mode``, the model's state and the RNG restored afterwards) and recorded
            as layers ``"<name>@probe"``, so distributions are compared on the same inputs.
        tensorboard: also write TensorBoard events to ``log_dir``.
        if_exists: what to do when ``log_dir`` already holds a run: ``"error"``, ``"overwrite"``,
            or ``"append"`` (read it back and continue; pass ``start_step``).
        start_step: the step number of the first step (for resumed training).

    Raises:
        ValueError: a bad option, a layer name or glob that selects nothing, or ``channels`` /
            ``hist_range`` naming a layer that is not watched.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[MonitorConfig] = None,
        *,
        log_dir: Optional[Union[str, Path]] = None,
        probe: Optional[Union[Tensor, tuple]] = None,
        tensorboard: bool = False,
        if_exists: Literal["error", "overwrite", "append"] = "error",
        start_step: int = 0,
        **overrides: Any,
    ) -> None:
        config = config if config is not None else MonitorConfig()
        if overrides:
            known = {f.name for f in dataclasses.fields(MonitorConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(
                    f"ActivationMonitor: expected MonitorConfig fields as keyword overrides, got "
                    f"{unknown}. Valid fields: {sorted(known)}."
                )
            config = dataclasses.replace(config, **overrides)
        if tensorboard and log_dir is None:
            raise ValueError(
                "tensorboard: expected a log_dir to write events to, got log_dir=None. "
                "Pass log_dir='runs/<name>'."
            )
        self.model = model
        self.config = config
        self.modules: list[str] = select_modules(model, config.layers)
        self._channels: dict[str, tuple[int, ...]] = dict(config.channels or {})
        for what, keys in (("channels", self._channels), ("hist_range", config.hist_range)):
            if isinstance(keys, Mapping):
                for k in keys:
                    if k not in self.modules:
                        raise ValueError(
                            f"{what}: expected names of watched layers, got {k!r}, which is not "
                            f"watched. Watched layers: {self.modules}. Add it to layers= or fix "
                            "the name."
                        )
        self._probe: Optional[tuple] = None
        if probe is not None:
            self._probe = probe if isinstance(probe, tuple) else (probe,)

        declared: list[str] = []
        for name in self.modules:
            declared += [name] + [f"{name}[{c}]" for c in self._channels.get(name, ())]
        if self._probe is not None:
            declared += [f"{n}@probe" for n in declared]
        self._declared = declared
        self.records = MonitorRecords(declared)

        # files
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._jsonl: Optional[io.JsonlWriter] = None
        self._tb: Optional[io.TensorBoardWriter] = None
        self._tensorboard = tensorboard
        self._edges: dict[str, np.ndarray] = {}  # point -> fixed edges (float64, representable)
        if self.log_dir is not None:
            previous = io.prepare_log_dir(self.log_dir, if_exists)
            if previous is not None:
                previous.declare(declared)
                self.records = previous
                self._edges.update({n: previous.histograms(n).edges for n in previous.histogram_layers()})
            self._jsonl = io.JsonlWriter(self.log_dir / io.JSONL_NAME)
        self._meta_written = False
        self._last_npz = -math.inf
        self._npz_dirty = False

        # recording state
        self._step = int(start_step)
        self._armed = self._step % config.every == 0
        self._recording = False  # inside a root forward that is being measured
        self._probing = False
        self._calls: dict[str, int] = {}
        self._pending: list[tuple[int, str, str, stats.Reduced]] = []  # (step, point, module, r)
        self._pending_steps = 0
        self._attached = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._positions: dict[tuple[int, torch.device], Tensor] = {}
        self._probe_tensors: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._warned_idle = False
        self._probed_step: Optional[int] = None

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "ActivationMonitor":
        """Start monitoring (idempotent). Measures the probe batch if this step is a checkpoint.

        Hooks are registered only while a checkpoint step is armed (from the :meth:`step` call
        that arms it to the next one), so the steps in between run at full speed.
        """
        if self._attached:
            return self
        self._attached = True
        self._write_meta()
        if self._armed:
            self._register()
            self._maybe_probe()
        return self

    def detach(self) -> None:
        """Stop monitoring and remove every hook. Recorded data stays available."""
        self._unregister()
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def _register(self) -> None:
        if self._handles:
            return
        mods = dict(self.model.named_modules())
        add = self._handles.append
        # The root's hooks open and close the measured window; the pre-hook goes first so that it
        # runs before a point hook on the root itself, the post-hook last (always, even on error).
        add(self.model.register_forward_pre_hook(self._root_enter, prepend=True))
        for name in self.modules:
            if self.config.point == "input":
                hook = functools.partial(self._on_input, name)
                add(mods[name].register_forward_pre_hook(hook, with_kwargs=True))
            else:
                add(mods[name].register_forward_hook(functools.partial(self._on_output, name)))
        add(self.model.register_forward_hook(self._root_exit, always_call=True))

    def _unregister(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recording = False

    def __enter__(self) -> "ActivationMonitor":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()
        finally:
            self.detach()
            self._close_files()

    def close(self) -> None:
        """Flush, detach and close the files."""
        self.__exit__(None, None, None)

    def _close_files(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # -- the training loop's side ----------------------------------------------------------
    @property
    def global_step(self) -> int:
        """The current step: the number of :meth:`step` calls, plus ``start_step``."""
        return self._step

    def step(self) -> None:
        """End the current optimizer step. Call once per step, after ``optimizer.step()``."""
        if self._armed and self._attached and not self._warned_idle:
            self._warned_idle = True
            warnings.warn(
                f"ActivationMonitor: step {self._step} was a checkpoint but no forward of the "
                "monitored model was recorded (none ran, all ran in eval mode, or all ran inside "
                "suspend_monitors()). The monitor records the first training-mode forward of the "
                "model it was given after each checkpoint step; pass record_eval=True to record "
                "eval-mode forwards. (Warned once.)",
                stacklevel=2,
            )
        self._step += 1
        self._armed = self._step % self.config.every == 0
        if self._pending_steps >= self.config.flush_every:
            self._flush(force_npz=False)
        if not self._attached:
            return
        if self._armed:
            self._register()
            self._maybe_probe()
        else:
            self._unregister()

    def flush(self, write_histograms: bool = True) -> None:
        """Move pending results to the host and write them out.

        Args:
            write_histograms: also rewrite ``histograms.npz`` now (it holds the whole run, so it is
                otherwise rewritten at most every ``histogram_write_interval`` seconds).
        """
        self._flush(force_npz=write_histograms)
        if self._tb is not None:
            self._tb.flush()

    # -- hooks -----------------------------------------------------------------------------
    def _root_enter(self, module: nn.Module, args: tuple) -> None:
        if self._probing:
            self._recording = True
        else:
            self._recording = (
                self._armed
                and (module.training or self.config.record_eval)
                and _SUSPENDED.get() == 0
            )
        if self._recording:
            self._calls = {}

    def _root_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._recording and not self._probing:
            self._armed = False  # one forward per checkpoint step
            self._pending_steps += 1
        self._recording = False

    def _on_input(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording:
            return
        x = args[0] if args and isinstance(args[0], Tensor) and args[0].is_floating_point() else None
        if x is None:
            x = _first_float_tensor((args, kwargs))
        if x is not None:
            self._measure(name, x)

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._recording:
            return
        x = _first_float_tensor(output)
        if x is not None:
            self._measure(name, x)

    def _measure(self, name: str, x: Tensor) -> None:
        # Shape-only Python logic here: nothing reads a value back from the device.
        c = self._calls.get(name, 0)
        self._calls[name] = c + 1
        base = name if c == 0 else f"{name}#{c}"
        suffix = "@probe" if self._probing else ""
        r = self._reduce(x, self.config.per_channel)
        if r is not None:
            self._pending.append((self._step, base + suffix, name, r))
        extra = self._channels.get(name)
        if extra:
            if x.dim() < 2 or max(extra) >= x.shape[1]:
                raise ValueError(
                    f"channels[{name!r}]: expected indices below the {x.shape[1] if x.dim() >= 2 else 0} "
                    f"channels (dim 1) of its activation of shape {tuple(x.shape)}, got "
                    f"{list(extra)}. Use indices in range, or drop the entry."
                )
            for ch in extra:
                r = self._reduce(x.select(1, ch), False)
                if r is not None:
                    self._pending.append((self._step, f"{base}[{ch}]{suffix}", name, r))

    def _reduce(self, x: Tensor, per_channel: bool) -> Optional[stats.Reduced]:
        n = x.numel()
        if n == 0 or x.is_complex():
            return None
        positions = None
        if n > self.config.sample_size:
            key = (n, x.device)
            positions = self._positions.get(key)
            if positions is None:
                positions = stats.sample_positions(n, self.config.sample_size, self.config.seed, x.device)
                self._positions[key] = positions
        return stats.reduce(x, positions, per_channel)

    # -- probe -----------------------------------------------------------------------------
    def _maybe_probe(self) -> None:
        if self._probe is not None and self._probed_step != self._step:
            self._probed_step = self._step  # once per checkpoint, even if re-attached
            self._run_probe()

    def _run_probe(self) -> None:
        model = self.model
        modes = {m: m.training for m in model.modules()}
        buffers = [b.detach().clone() for b in model.buffers()] if self.config.probe_mode == "train" else []
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
            self._probing = True
            try:
                if self.config.probe_mode == "eval":
                    model.eval()
                model(*self._probe)  # type: ignore[misc]
            finally:
                self._probing = False
                for m, training in modes.items():
                    m.training = training
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)

    # -- flush: device -> host, then files -------------------------------------------------
    def _user_range(self, module: str) -> Optional[tuple[float, float]]:
        rng = self.config.hist_range
        return rng.get(module) if isinstance(rng, Mapping) else rng

    def _probes(self, point: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (point, dtype, device)
        t = self._probe_tensors.get(key)
        if t is None:
            probes = stats.search_probes(self._edges[point], self.config.saturation_threshold, dtype)
            t = self._probe_tensors[key] = torch.tensor(probes, dtype=dtype, device=device)
        return t

    def _flush(self, force_npz: bool) -> None:
        pending, self._pending = self._pending, []
        self._pending_steps = 0
        if pending:
            with _one_cpu_thread():
                self._process(pending)
        if self.log_dir is None:
            return
        now = time.monotonic()
        if self._npz_dirty and (force_npz or now - self._last_npz >= self.config.histogram_write_interval):
            io.write_histograms(self.log_dir / io.NPZ_NAME, self.records)
            self._last_npz, self._npz_dirty = now, False

    def _process(self, pending: list[tuple[int, str, str, stats.Reduced]]) -> None:
        cfg = self.config
        # Fix the edges of points seen for the first time: from the user's range, else from the
        # first measurement (one extra sync, once per point in the whole run).
        new: dict[str, stats.Reduced] = {}
        for _, point, module, r in pending:
            if point not in self._edges and point not in new:
                rng = self._user_range(module)
                if rng is not None:
                    self._edges[point] = stats.fixed_edges(rng[0], rng[1], cfg.hist_bins, r.sample.dtype)
                else:
                    new[point] = r
        if new:
            firsts = stats.to_host([stats.sort_rows(r.sample[None]) for r in new.values()])
            for (point, r), s in zip(new.items(), firsts):
                self._edges[point] = stats.auto_edges(s[0], cfg.hist_bins, cfg.hist_pad, r.sample.dtype)

        # Group records that can be stacked: same point, sample length and dtype, and the same
        # kind (moments from the hook, or from the sample when the sample is every value).
        groups: dict[tuple, list[int]] = {}
        for i, (_, point, _, r) in enumerate(pending):
            key = (
                point, r.sample.numel(), r.sample.dtype, r.mean is None,
                None if r.channel is None else r.channel[0].numel(),
            )
            groups.setdefault(key, []).append(i)

        tensors: list[Tensor] = []
        for (point, _, _, exact, _), idx in groups.items():
            recs = [pending[i][3] for i in idx]
            s = stats.sort_rows(torch.stack([r.sample for r in recs]), inplace=True)  # (R, n)
            pct = stats.percentiles_sorted(s, cfg.percentiles)  # (R, P)
            below = stats.search_sorted(s, self._probes(point, s.dtype, s.device))  # (R, B + 5)
            if exact:  # last: it overwrites s
                moments = stats.moments_sorted(s, inplace=True)
            else:
                moments = torch.stack([t for r in recs for t in (r.mean, r.sq_dev, r.min, r.max)])
            tensors += [moments.view(len(recs), 4), pct, below]
            if recs[0].channel is not None:
                tensors += [torch.stack([r.channel[k] for r in recs]) for k in range(3)]  # type: ignore[index]
        host = iter(stats.to_host(tensors))

        # Host side, vectorized per group; then one chunk per point, in recording order.
        base = ["mean", "std", "min", "max", *(f"p{q:g}" for q in cfg.percentiles), "frac_saturated", "frac_zero"]
        per_point: dict[str, list[tuple]] = {}
        for (point, k, _, _, channels), idx in groups.items():
            moments, pct, below = (next(host) for _ in range(3))
            hist, n_sat, n_nonpos = stats.counts_from_search(below, k, cfg.hist_bins)
            numel = np.array([pending[i][3].numel for i in idx], dtype=np.float64)
            cols = [
                moments[:, 0], np.sqrt(np.maximum(moments[:, 1], 0) / numel), moments[:, 2], moments[:, 3],
                *pct.T, n_sat / k, n_nonpos / k,
            ]
            names = list(base)
            cm = cs = None
            if channels is not None:
                cm, cv, cx = (next(host).astype(np.float64) for _ in range(3))
                cs = np.sqrt(np.maximum(cv, 0))
                cols.append((cx <= 0).mean(axis=1))
                names.append("frac_dead")
            cols.append(numel)
            names.append("numel")
            values = np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1)  # (R, S)
            per_point.setdefault(point, []).append((np.asarray(idx), names, values, hist, cm, cs))

        lines: list[tuple[int, str]] = []
        for point, parts in per_point.items():
            idx = np.concatenate([p[0] for p in parts])
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
            names = parts[0][1]
            values = np.concatenate([p[2] for p in parts])[order]
            hist = np.concatenate([p[3] for p in parts])[order]
            cm = None if parts[0][4] is None else np.concatenate([p[4] for p in parts])[order]
            cs = None if parts[0][5] is None else np.concatenate([p[5] for p in parts])[order]
            steps = [pending[i][0] for i in idx.tolist()]
            self.records.add(
                point, steps, names, values, counts=hist, edges=self._edges[point], channel_mean=cm, channel_std=cs
            )
            if self._jsonl is None and not self._tensorboard:
                continue
            for j, (i, step) in enumerate(zip(idx.tolist(), steps)):
                sc = dict(zip(names, values[j].tolist()))
                if self._jsonl is not None:
                    c_m, c_s = (None, None) if cm is None else (cm[j], cs[j])  # type: ignore[index]
                    lines.append((i, io.record_line(step, point, sc, c_m, c_s)))
                if self._tensorboard:
                    if self._tb is None:
                        self._tb = io.TensorBoardWriter(self.log_dir)  # type: ignore[arg-type]
                    self._tb.write(step, point, sc, hist[j], self._edges[point])
        if self._jsonl is not None:
            self._jsonl.write([line for _, line in sorted(lines)])
        self._npz_dirty = True

    def _write_meta(self) -> None:
        if self.log_dir is None or self._meta_written:
            return
        from covshift import __version__

        io.write_json_atomic(
            self.log_dir / io.META_NAME,
            {
                "format": io.FORMAT,
                "covshift_version": __version__,
                "model": type(self.model).__name__,
                "modules": self.modules,
                "layers": self._declared,
                "config": self.config.to_dict(),
            },
        )
        self._meta_written = True

    # -- views (they flush pending results first) ------------------------------------------
    def _ready(self) -> MonitorRecords:
        if self._pending:
            self._flush(force_npz=False)
        return self.records

    @property
    def layers(self) -> list[str]:
        """Names of the measured points: watched modules, channel extras (``"name[c]"``), probe
        variants (``"name@probe"``), then extra calls seen while recording (``"name#1"``)."""
        return self._ready().layers

    def table(self, layers: Optional[Sequence[str]] = None, stats: Optional[Sequence[str]] = None) -> list[dict]:
        """Tidy rows ``{"step", "layer", "stat", "value"}``; see :meth:`MonitorRecords.table`."""
        return self._ready().table(layers, stats)

    def series(self, layer: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one statistic of one layer."""
        return self._ready().series(layer, stat)

    def histograms(self, layer: str) -> Histograms:
        """Histograms of one layer over time, on its fixed edges, tails included."""
        return self._ready().histograms(layer)

    def channel_stats(self, layer: str) -> ChannelStats:
        """Per-channel mean and std over time (``per_channel=True``)."""
        return self._ready().channel_stats(layer)

    def steps(self, layer: str) -> np.ndarray:
        """Steps at which ``layer`` was recorded."""
        return self._ready().steps(layer)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"ActivationMonitor({type(self.model).__name__}, {len(self.modules)} layers, "
            f"every={self.config.every}, step={self._step}, {state})"
        )
