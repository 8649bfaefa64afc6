"""Writing result files safely: atomically, durably, with ordinary permissions, and under a lock when shared.

* :func:`atomic_write` writes through a temporary file in the target's directory, fsyncs it, gives it the
  permissions any new file of this process would get (``0o666 & ~umask``; ``mkstemp`` alone makes it owner-only),
  and renames it over the target, so a reader never sees a truncated file and a crash leaves the old one.
* :func:`safe_torch_load` reads a file that may come from someone else: ``torch.load(weights_only=True)`` (data, never
  code), with one clear message per way a file can be wrong (empty, truncated, not torch's, holding pickled objects).
* :func:`file_lock` is an exclusive advisory lock (POSIX ``lockf``, which also works on NFS, where SLURM jobs of
  one sweep share a directory) held while a process reads, merges and rewrites a shared file, or computes a cached
  result once for every process that wants it (FID reference statistics, a pretrained model's Gamma).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "file_lock", "safe_torch_load"]

log = logging.getLogger(__name__)
#: errors of a non-blocking lockf that mean "another process holds the lock" (anything else: no locking here)
_HELD = (errno.EAGAIN, errno.EACCES)


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file, then publish it as ``path`` atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX); harmless to skip elsewhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float | None = 600.0, what: str = "",
              quiet: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Waits for another holder up to ``timeout`` seconds (None: forever; 0: not at all), then raises ``TimeoutError``
    naming the file (``quiet``: without logging that it waits). A holder that dies releases the lock with its
    process. On systems without ``fcntl``, and on file systems that do not support locks (``ENOLCK``,
    ``EOPNOTSUPP``, ...), it yields without locking, with a warning.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _default_mode())
    try:
        start, waiting, locked = time.monotonic(), False, True
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in _HELD:
                    log.warning("cannot lock %s (%s): going on without the lock", path, os.strerror(e.errno or 0))
                    locked = False
                    break
                if not waiting:
                    waiting = True
                    if not quiet:
                        log.info("waiting for %s: another process holds its lock", what or path)
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"{what or path} is locked by another process for more than {timeout:.0f} s "
                        f"(lock file {path}); is another run writing the same directory?"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            if locked:
                fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def safe_torch_load(path: str | os.PathLike, map_location="cpu", what: str = "file", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with a ``ValueError`` that says what is wrong with the file.

    Never suggests ``weights_only=False``: a file that needs it holds pickled code, which this project refuses to
    run (it may come from someone else). ``what`` names the file in messages ("checkpoint", "Gamma file", ...);
    ``kwargs`` go to ``torch.load`` (e.g. ``mmap=True``).
    """
    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a {what}; was it written completely?")
    with open(path, "rb") as fh:
        head = fh.read(4)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head.startswith(b"PK"):  # torch.save's zip archive, cut short: its directory is missing
        raise ValueError(f"{path} is truncated or damaged: a zip archive (torch.save's format) without its end; "
                         f"was it written completely? Use another copy of the {what}")
    if not is_zip and not head.startswith(b"\x80"):  # neither torch.save's zip nor its legacy pickle format
        raise ValueError(f"{path} is not a readable PyTorch {what}: not a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        text = str(e)
        if "Unsupported global" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            detail = f" (it names {found.group(1)})" if found else ""
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors and plain containers{detail}; refusing to "
                f"unpickle it, since that could run code. A {what} of this project holds only tensors, numbers, "
                "strings, lists and dicts."
            ) from None
        if is_zip:
            reason = f"a damaged archive ({type(e).__name__})"
        else:
            reason = "not a file written by torch.save (no zip archive inside)"
        raise ValueError(f"{path} is not a readable PyTorch {what}: {reason}") from None
