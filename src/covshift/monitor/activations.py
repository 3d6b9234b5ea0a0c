"""ActivationMonitor: records the distribution of chosen activations while any model trains.

Usage::

    mon = ActivationMonitor(model, every=10, log_dir="runs/mlp")
    with mon:                       # attach hooks; on exit: flush, detach, close files
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step()              # once per optimizer step
    steps, p50 = mon.series("layers.2.act", "p50")

or, in a loop that is not yours (Lightning, Accelerate, HF Trainer), let the optimizer step it::

    mon = ActivationMonitor(model, optimizer=opt, every=10, log_dir="runs/mlp").attach()

How it records. Step ``t`` counts calls to :meth:`ActivationMonitor.step` (or steps of
``optimizer``); when ``t % every == 0``
the monitor is *armed*, and the first forward of ``model`` that follows (in training mode, unless
``record_eval``) is measured: every watched module's input (or output) is reduced on its device by
:func:`covshift.monitor.stats.reduce`, inside the hook. Later forwards in the same step (gradient
accumulation, evaluation) are not recorded. Results wait on the device and move to the host in one
batch every ``flush_every`` recorded steps, when :meth:`~ActivationMonitor.flush` is called, when a
view (``table``, ``series``, ...) is read, or on leaving the ``with`` block.

Hooks exist only during armed steps: :meth:`~ActivationMonitor.step` registers them when it arms a
checkpoint and removes them at the next call, so the steps in between cost nothing.

Under ``torch.compile`` dynamo neither retraces when hooks are added or removed nor replays a traced
hook's Python, so the monitor changes its ways:

* given what ``torch.compile(model)`` returns, whose own hooks run outside the graph, it runs the
  measured forward of each checkpoint eagerly (the root's pre-hook sets
  ``torch.compiler.set_stance("force_eager")``, its post-hook restores the stance); every other step
  runs the compiled graph, which was traced without the hooks;
* on a model compiled in place (``model.compile()``) or holding compiled modules, its hooks stay
  registered from :meth:`~ActivationMonitor.attach` to :meth:`~ActivationMonitor.detach` and are
  opaque to dynamo (``torch.compiler.disable``): the compiled forward calls them as Python at every
  step, a graph break per watched module. Attach the monitor before the model's first forward: a
  compiled submodule traced without the hooks never calls them (the monitor then warns that a
  checkpoint recorded nothing).

A module called several times in one forward (shared weights, one activation module reused) is
recorded per call: ``"act"``, ``"act#1"``, ``"act#2"``, ... Only modules are seen: an activation
called as a function (``torch.sigmoid`` inside ``forward``) is watched through the module before it
with ``point="output"``.

Under data parallelism the statistics are per process by default (``reduce="rank"``): each rank
measures its own shard. With ``reduce="global"`` every flush merges them across the ranks of the
process group (:mod:`covshift.monitor.distributed`) and only rank 0 writes files.

The flush itself (stage-2 statistics, the host copy, the typed batch) is :mod:`covshift.monitor.flush`;
the writers are in :mod:`covshift.monitor.io`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from covshift.monitor import flush as _flush_mod
from covshift.monitor import io, stats
from covshift.monitor.config import MonitorConfig
from covshift.monitor.flush import Pending
from covshift.monitor.records import ChannelStats, Histograms, Layer, MonitorRecords, RecordKey
from covshift.monitor.hooks import _first_float_tensor, compile_wrapper, compiled, eager, eager_hook, suspend_monitors, suspended
from covshift.monitor.probe import probe_state
from covshift.monitor.selection import select_modules
from covshift.monitor.writer import RunWriter

__all__ = ["ActivationMonitor", "suspend_monitors"]


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
        optimizer: a ``torch.optim.Optimizer`` whose every ``step()`` ends a monitor step (through
            ``Optimizer.register_step_post_hook``, registered on :meth:`attach`, removed on
            :meth:`detach`), so the training loop needs no :meth:`step` call. Calling
            :meth:`step` as well is an error (it would count each step twice).
        process_group: the group over which ``reduce="global"`` merges (default: the world).

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
        optimizer: Optional[torch.optim.Optimizer] = None,
        process_group: Any = None,
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
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}. Pass the "
                "optimizer that trains the model, or None and call mon.step() after each optimizer step."
            )
        self.model = model
        self.config = config
        self.optimizer = optimizer
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

        declared: list[RecordKey] = []
        for name in self.modules:
            declared += [RecordKey(name)] + [RecordKey(name, channel=c) for c in self._channels.get(name, ())]
        if self._probe is not None:
            declared += [dataclasses.replace(k, probe=True) for k in declared]
        self._declared = declared

        # distributed: merge across ranks at flush; only rank 0 writes
        self._group = process_group
        self._global = config.reduce == "global"
        writer_rank = True
        if self._global:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "reduce: expected an initialized torch.distributed process group for "
                    "reduce='global', got none. Call torch.distributed.init_process_group() first, "
                    "or use reduce='rank' (per-process statistics)."
                )
            writer_rank = dist.get_rank(process_group) == 0
        self._writer = RunWriter(
            declared, log_dir if writer_rank else None, if_exists, tensorboard, config.histogram_write_interval
        )
        self.log_dir = self._writer.log_dir
        self._writer_rank = writer_rank
        self._edges = _flush_mod.Edges(dict(self._writer.edges))

        # recording state
        self._step = int(start_step)
        self._armed = self._step % config.every == 0
        self._recording = False  # inside a root forward that is being measured
        self._probing = False
        self._calls: dict[str, int] = {}
        self._pending: list[Pending] = []
        self._pending_steps = 0
        self._attached = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._opt_handle: Optional[torch.utils.hooks.RemovableHandle] = None
        self._in_opt_hook = False
        self._positions: dict[tuple[int, torch.device], Tensor] = {}
        self._keys: dict[tuple[str, int, bool], RecordKey] = {}  # (module, call, probe) -> key
        self._threshold = float(config.saturation_threshold)
        self._qs = [float(q) for q in config.percentiles]
        self._warned_idle = False
        self._probed_step: Optional[int] = None
        self._hook_plan: Optional[list[tuple[nn.Module, Any]]] = None  # (module, bound hook) per watched name
        self._root_hooks: tuple[Any, Any] = (self._root_enter, self._root_exit)
        self._persistent = False  # hooks kept registered while attached (a compiled model): see attach()
        self._switch = False  # the measured forward runs eagerly (the model is a torch.compile wrapper)
        self._stance: Any = None  # torch.compiler.set_stance("force_eager") while that forward runs
        self._sample_size = int(config.sample_size)
        self._flush_every = int(config.flush_every)
        self._every = int(config.every)

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "ActivationMonitor":
        """Start monitoring (idempotent). Measures the probe batch if this step is a checkpoint.

        Hooks are registered only while a checkpoint step is armed (from the :meth:`step` call
        that arms it to the next one), so the steps in between run at full speed. With
        ``optimizer=``, also registers the optimizer's step post-hook.
        """
        if self._attached:
            return self
        self._attached = True
        # see the module docstring: a compiled model's checkpoints run eagerly, or its hooks persist
        self._switch = compile_wrapper(self.model)
        self._persistent = not self._switch and compiled(self.model)
        self._hook_plan = None
        self._write_meta()
        if self.optimizer is not None:
            self._opt_handle = self.optimizer.register_step_post_hook(self._on_optimizer_step)
        if self._armed or self._persistent:
            self._register()
        if self._armed:
            self._maybe_probe()
        return self

    def detach(self) -> None:
        """Stop monitoring and remove every hook (the optimizer's too). Recorded data stays available."""
        self._unregister()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def _register(self) -> None:
        if self._handles:
            return
        wrap = eager_hook if self._persistent else (lambda f: f)
        if self._hook_plan is None:  # resolved once: at every=10 this runs every tenth step
            mods = dict(self.model.named_modules())
            on = self._on_input if self.config.point == "input" else self._on_output
            self._hook_plan = [(mods[n], wrap(functools.partial(on, n))) for n in self.modules]
            self._root_hooks = (wrap(self._root_enter), wrap(self._root_exit))
        add = self._handles.append
        # The root's hooks open and close the measured window; the pre-hook goes first so that it
        # runs before a point hook on the root itself, the post-hook last (always, even on error).
        add(self.model.register_forward_pre_hook(self._root_hooks[0], prepend=True))
        pre = self.config.point == "input"
        for mod, hook in self._hook_plan:
            add(mod.register_forward_pre_hook(hook, with_kwargs=True) if pre else mod.register_forward_hook(hook))
        add(self.model.register_forward_hook(self._root_hooks[1], always_call=True))

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
        self._writer.close()

    # -- the training loop's side ----------------------------------------------------------
    @property
    def global_step(self) -> int:
        """The current step: the number of :meth:`step` calls (or optimizer steps), plus ``start_step``."""
        return self._step

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._in_opt_hook = True
        try:
            self._advance()
        finally:
            self._in_opt_hook = False

    def step(self) -> None:
        """End the current optimizer step. Call once per step, after ``optimizer.step()``.

        Raises:
            RuntimeError: the monitor was given ``optimizer=``, which already steps it.
        """
        if self.optimizer is not None and not self._in_opt_hook:
            raise RuntimeError(
                "ActivationMonitor.step(): expected no explicit step() calls on a monitor created with "
                f"optimizer= (its {type(self.optimizer).__name__}.step() already ends each monitor step; "
                "calling both would count every step twice). Remove the mon.step() call, or create the "
                "monitor without optimizer=."
            )
        self._advance()

    def _advance(self) -> None:
        if self._armed and self._attached and not self._warned_idle:
            self._warned_idle = True
            warnings.warn(
                f"ActivationMonitor: step {self._step} was a checkpoint but no forward of the "
                "monitored model was recorded (none ran, all ran in eval mode, or all ran inside "
                "suspend_monitors(), or the model is torch.compile'd and was compiled before the monitor "
                "was attached, so its graph never calls the hooks). The monitor records the first "
                "training-mode forward of the model it was given after each checkpoint step; pass "
                "record_eval=True to record eval-mode forwards; attach the monitor before a compiled "
                "model's first forward (or call torch._dynamo.reset()). (Warned once.)",
                stacklevel=3,
            )
        self._step += 1
        self._armed = self._step % self._every == 0
        if self._pending_steps >= self._flush_every:
            self._flush(force_npz=False)
        if not self._attached:
            return
        if self._armed:
            self._register()
            self._maybe_probe()
        elif not self._persistent:
            self._unregister()

    def flush(self, write_histograms: bool = True) -> None:
        """Move pending results to the host and write them out.

        Under ``reduce="global"`` this is a collective: every rank of the group must call it
        (leaving the ``with`` block calls it).

        Args:
            write_histograms: also rewrite ``histograms.npz`` now (it holds the whole run, so it is
                otherwise rewritten at most every ``histogram_write_interval`` seconds).
        """
        self._flush(force_npz=write_histograms)
        self._writer.flush()

    # -- hooks -----------------------------------------------------------------------------
    def _root_enter(self, module: nn.Module, args: tuple) -> None:
        if self._probing:
            self._recording = True
        else:
            self._recording = (
                self._armed
                and (module.training or self.config.record_eval)
                and not suspended()
            )
        if self._recording:
            self._calls.clear()
            if self._switch and self._stance is None:
                self._stance = torch.compiler.set_stance("force_eager")  # set now; _root_exit restores

    def _root_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        # A forward counts as this checkpoint's only when a watched module was measured in it (a
        # compiled graph traced without the hooks runs the root's hooks but none inside).
        if self._recording and not self._probing and self._calls:
            self._armed = False  # one forward per checkpoint step
            self._pending_steps += 1
        self._recording = False
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)  # the stance before _root_enter's

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
        calls = self._calls
        c = calls.get(name, 0)
        calls[name] = c + 1
        probing = self._probing
        key = self._keys.get((name, c, probing))
        if key is None:
            key = self._keys[(name, c, probing)] = RecordKey(name, c, None, probing)
        self._record(key, x, self.config.per_channel)
        extra = self._channels.get(name)
        if extra:
            if x.dim() < 2 or max(extra) >= x.shape[1]:
                raise ValueError(
                    f"channels[{name!r}]: expected indices below the {x.shape[1] if x.dim() >= 2 else 0} "
                    f"channels (dim 1) of its activation of shape {tuple(x.shape)}, got "
                    f"{list(extra)}. Use indices in range, or drop the entry."
                )
            for ch in extra:
                self._record(RecordKey(name, c, ch, probing), x.select(1, ch), False)

    def _record(self, key: RecordKey, x: Tensor, per_channel: bool) -> None:
        n = x.numel()
        # Under reduce="global" an empty shard still gives a record (count 0), so that every rank
        # has the same records in the same order.
        if (n == 0 and not self._global) or x.is_complex():
            return
        positions = None
        if n > self._sample_size:
            pkey = (n, x.device)
            positions = self._positions.get(pkey)
            if positions is None:
                positions = stats.sample_positions(n, self._sample_size, self.config.seed, x.device)
                self._positions[pkey] = positions
        edges = None if self._global else self._edges.tensors.get(key)
        if edges is not None and n and stats.fused_available(x):
            # The fast path: every statistic now, in one fused call; no copy of x is kept.
            row = stats.record_op()(x.detach(), positions, edges, self._threshold, self._qs)
            channel = stats.channel_moments(x) if per_channel else None
            self._pending.append(Pending(self._step, key, None, row, channel, n))
        else:
            self._pending.append(Pending(self._step, key, stats.reduce(x, positions, per_channel)))

    # -- probe -----------------------------------------------------------------------------
    def _maybe_probe(self) -> None:
        if self._probe is not None and self._probed_step != self._step:
            self._probed_step = self._step  # once per checkpoint, even if re-attached
            self._run_probe()

    def _run_probe(self) -> None:
        with probe_state(self.model, self.config.probe_mode), eager(self.model, self._persistent):
            self._probing = True
            try:
                self.model(*self._probe)  # type: ignore[misc]
            finally:
                self._probing = False

    # -- flush: device -> host, then files -------------------------------------------------
    @property
    def records(self) -> MonitorRecords:
        """Everything recorded so far (flushed), by record key and step."""
        return self._writer.records

    def _flush(self, force_npz: bool) -> None:
        pending, self._pending = self._pending, []
        self._pending_steps = 0
        batch = _flush_mod.flush_pending(
            pending, self._edges, self.config, group=self._group if self._global else None,
            distributed=self._global,
        )
        if batch is not None and self._writer_rank:  # under reduce="global", rank 0 only
            self._writer.write(batch)
        self._writer.write_histograms(force_npz)

    def _write_meta(self) -> None:
        from covshift import __version__

        self._writer.write_meta(
            {
                "covshift_version": __version__,
                "model": type(self.model).__name__,
                "modules": self.modules,
                "layers": [str(k) for k in self._declared],
                "keys": [io.key_fields(k) for k in self._declared],
                "config": self.config.to_dict(),
            }
        )

    # -- views (they flush pending results first) ------------------------------------------
    def _ready(self) -> MonitorRecords:
        if self._pending and not self._global:  # under reduce="global" only flush() merges
            self._flush(force_npz=False)
        return self.records

    @property
    def layers(self) -> list[str]:
        """Names of the measured points: watched modules, channel extras (``"name[c]"``), probe
        variants (``"name@probe"``), then extra calls seen while recording (``"name#1"``)."""
        return self._ready().layers

    @property
    def keys(self) -> list[RecordKey]:
        """The typed identities of :attr:`layers`, in the same order."""
        return self._ready().keys

    def table(self, layers: Optional[Sequence[Layer]] = None, stats: Optional[Sequence[str]] = None) -> list[dict]:
        """Tidy rows ``{"step", "layer", "stat", "value"}``; see :meth:`MonitorRecords.table`."""
        return self._ready().table(layers, stats)

    def series(self, layer: Layer, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one statistic of one layer."""
        return self._ready().series(layer, stat)

    def histograms(self, layer: Layer) -> Histograms:
        """Histograms of one layer over time, on its fixed edges, tails included."""
        return self._ready().histograms(layer)

    def channel_stats(self, layer: Layer) -> ChannelStats:
        """Per-channel mean and std over time (``per_channel=True``)."""
        return self._ready().channel_stats(layer)

    def steps(self, layer: Layer) -> np.ndarray:
        """Steps at which ``layer`` was recorded."""
        return self._ready().steps(layer)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"ActivationMonitor({type(self.model).__name__}, {len(self.modules)} layers, "
            f"every={self.config.every}, step={self._step}, {state})"
        )
