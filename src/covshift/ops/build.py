r"""Compiling and loading covshift's C++ extensions, once per machine.

Each extension is one C++ file under ``covshift/csrc`` that registers its operators with
``TORCH_LIBRARY`` (so they appear as ``torch.ops.<name>.*``). :func:`load_library` compiles it with
:func:`torch.utils.cpp_extension.load` (and the ``ninja`` package) on first use, into
``$COVSHIFT_EXTENSIONS_DIR`` (default ``~/.cache/covshift/extensions``), one folder per torch version,
Python version and CPU capability; later processes only load the shared library. One file lock per
folder serializes concurrent builds (``pytest -n 2``). A build that fails is recorded, never raised:
callers fall back to their reference code and say why (:func:`status`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch

__all__ = ["CSRC", "Extension", "load_library", "status", "build_directory"]

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@dataclasses.dataclass
class Extension:
    """What one extension is doing in this process."""

    name: str  # library name, also its operator namespace: torch.ops.<name>.*
    source: Path
    loaded: bool = False  # the operators are registered in this process
    error: Optional[str] = None  # why building or loading failed, once it has
    library: Optional[str] = None  # path of the shared library, once built here


_extensions: dict[str, Extension] = {}
_lock = threading.Lock()


def cpu_flags() -> tuple[str, list[str]]:
    """(capability tag, compiler flags) for this CPU, as ATen's own vectorized kernels see it."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if cap == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def build_directory() -> Path:
    """Where extensions are compiled and cached: one folder per torch, Python and CPU capability
    (and in it one folder per extension)."""
    root = os.environ.get("COVSHIFT_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "covshift" / "extensions"
    tag = f"torch{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}-{cpu_flags()[0]}"
    return base / tag


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock over one extension's build, across processes; released if its holder dies."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock file still serializes the build
        yield
        return
    with open(directory / "covshift-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # Under our lock nobody else is building this extension, so torch's lock file, if any, is
            # stale (left by a process killed mid-build); torch would wait on it forever.
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(name: str, source: Path) -> str:
    """Compile (or find up to date) and load one extension; returns the shared library's path."""
    from torch.utils import cpp_extension

    directory = build_directory() / name  # one folder per extension: torch's lock file is per folder
    _, flags = cpu_flags()
    path = os.environ.get("PATH", "")
    try:
        import ninja  # the pip package: its binary is not on PATH unless the venv is activated

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass  # cpp_extension finds a system ninja, or says that it needs one
    try:
        with _build_lock(directory):
            return cpp_extension.load(
                name=name,
                sources=[str(source)],
                extra_cflags=["-O3", "-fopenmp", *flags],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    finally:
        os.environ["PATH"] = path


def short_error(error: BaseException, limit: int = 600) -> str:
    """One line: the exception's type and text, cut in the middle (compiler logs end with the useful part)."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:200] + " ... " + text[-(limit - 205) :]
    return f"{type(error).__name__}: {text}"


def load_library(
    name: str, source: Optional[Path] = None, *, probe: Optional[str] = None, namespace: Optional[str] = None
) -> Extension:
    """Build (if needed) and load the extension ``name`` in this process; never raises.

    Args:
        name: the library (shared object) name.
        source: its C++ file; default ``covshift/csrc/<name>.cpp``.
        probe: an operator name that must exist in ``torch.ops.<namespace>`` once loaded.
        namespace: the operator namespace its ``TORCH_LIBRARY`` block defines; default ``name``.

    Returns:
        The :class:`Extension` record; ``.loaded`` says whether its operators can be called, ``.error`` why not.
    """
    ext = _extensions.get(name)
    if ext is not None and (ext.loaded or ext.error is not None):
        return ext
    with _lock:
        ext = _extensions.setdefault(name, Extension(name, source or CSRC / f"{name}.cpp"))
        if ext.loaded or ext.error is not None:
            return ext
        def present() -> bool:
            try:
                return probe is None or hasattr(getattr(torch.ops, namespace or name), probe)
            except (AttributeError, RuntimeError):
                return False
        try:
            ext.library = _compile(name, ext.source)
            if present():
                ext.loaded = True
            else:
                ext.error = f"the compiled library did not register torch.ops.{namespace or name}.{probe}"
        except Exception as error:  # noqa: BLE001 - any failure means: use the reference path
            ext.error = f"the C++ extension {name} could not be built or loaded ({short_error(error)}); build folder {build_directory()}"
    return ext


def status(name: str) -> Optional[Extension]:
    """The record of extension ``name`` in this process, or None if nobody asked for it yet."""
    return _extensions.get(name)
