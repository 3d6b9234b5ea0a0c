"""Files that survive interruption: atomic replacement for whole files, flushed appends for logs.

One JSON Lines writer (:class:`JsonlWriter`, :func:`append_jsonl`) and one reader
(:func:`read_jsonl`), shared by the monitor and the experiments:

* every line is written whole and flushed to the OS at once, so a killed process keeps every line
  it wrote, and at most its last line is cut short;
* a cut-short *last* line is skipped with a :class:`TruncatedJsonlWarning` naming the file and the
  line; an unreadable line anywhere else raises :class:`JsonlError` with the file and line number
  (silently dropping the rest of a file would hide data loss).

Atomic writes create files with the permissions ``open()`` would (``0o666 & ~umask``), not the
0600 of a bare ``tempfile.mkstemp``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Iterable, Optional, Union

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "append_jsonl",
    "read_jsonl",
    "JsonlWriter",
    "json_number",
    "JsonlError",
    "TruncatedJsonlWarning",
]

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    # Linux reports it without changing it; elsewhere the only way to read it is to set it and put
    # it straight back (a moment in which another thread's new file would get umask 0).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    A reader (or a crash) sees either the old file or the new one, never half of one. The file gets
    ``0o666 & ~umask``, as a plain ``open(path, "w")`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=float) + "\n"


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_number(v: float) -> str:
    """``v`` as :func:`json.dumps` writes a float (``NaN`` / ``Infinity`` for non-finite values)."""
    r = repr(float(v))
    return _NON_FINITE.get(r, r)


class JsonlWriter:
    """Appends JSON lines to one file, each call's lines written together and flushed to the OS.

    The file is opened on the first write and kept open until :meth:`close`.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._f: Optional[IO[str]] = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append one line per record (non-finite floats as ``NaN`` / ``Infinity``)."""
        self.write_lines([_line(r) for r in records])

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append lines already encoded (each a JSON object ending in a newline, see :func:`json_number`)."""
        text = "".join(lines)
        if not text:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(text)
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_jsonl(path: PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so an interrupted run keeps every line written."""
    with JsonlWriter(path) as w:
        w.write([record])


class JsonlError(ValueError):
    """A line in the middle of a JSON Lines file is not valid JSON."""


class TruncatedJsonlWarning(UserWarning):
    """The last line of a JSON Lines file was cut short (a crash mid-write) and was skipped."""


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Every line of a JSON Lines file as a dict; blank lines are skipped.

    Raises:
        JsonlError: a line other than the last is not valid JSON (names the file and line).

    Warns:
        TruncatedJsonlWarning: the last line is not valid JSON and does not end with a newline (a
            write cut short); it is skipped.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write stopped in this line
                warnings.warn(
                    f"{path}:{i + 1}: skipped a truncated last line (a write cut short): {line[:80]!r}",
                    TruncatedJsonlWarning,
                    stacklevel=2,
                )
                continue
            raise JsonlError(
                f"{path}:{i + 1}: expected a JSON object on every line, got an unreadable line "
                f"({e.msg} at column {e.colno}): {line[:80]!r}. The file is corrupt; fix or remove that line."
            ) from None
    return out
