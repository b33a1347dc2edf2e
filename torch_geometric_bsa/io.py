"""Safe files: checksummed writes, loads that cannot run code, and a lock for output folders.

Every file the package and ``examples/train.py`` read back (checkpoints, ``--snapshot`` files,
processed dataset caches) goes through :func:`save_checked` / :func:`load_checked`: a short text
header with the payload's size and SHA-256, then the ``torch.save`` bytes. Loading verifies both
before anything is unpickled, and unpickles with ``weights_only=True`` and an explicit allowlist
(:data:`SAFE_GLOBALS`), so a crafted file is refused instead of running code. See docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import os.path as osp
import pickle
import re
import shutil
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["FileCheckError", "CorruptFileError", "UnsafeFileError", "LockError", "SAFE_GLOBALS",
           "save_checked", "load_checked", "atomic_write", "remove_stale_temps", "previous_path",
           "DirLock", "pid_alive"]

MAGIC = b"TORCH_GEOMETRIC_BSA CHECKED FILE\n"
FORMAT_VERSION = 1
_HEADER_MAX = 1024  # the JSON header line is far shorter; a longer one is corrupt


class FileCheckError(ValueError):
    r"""A file could not be loaded safely; the message names the file and the reason."""


class CorruptFileError(FileCheckError):
    r"""The file is empty, truncated, fails its checksum, or is not a checked file at all."""


class UnsafeFileError(FileCheckError):
    r"""The file's checksum is intact but its content asks for code or classes outside the
    allowlist (a crafted pickle): it is refused and nothing in it runs."""


class LockError(RuntimeError):
    r"""Another live process holds the lock of an output folder."""


def _safe_globals() -> List[Any]:
    from .balltree import BallTree  # a cached tree (CacheBallTree as pre_transform) may sit in a cache
    return [BallTree]


#: Classes besides tensors and plain Python containers that :func:`load_checked` lets a file build.
SAFE_GLOBALS = _safe_globals()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    r"""Call ``write(tmp_path)``, flush it to disk, then rename it onto ``path``: readers never see a
    half-written file, and a killed writer leaves only a ``<path>.tmp-<pid>-<hex>`` file that
    :func:`remove_stale_temps` cleans up later."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def previous_path(path: str) -> str:
    r"""Where :func:`save_checked` keeps the previous version of ``path`` (``a/ck.pt`` -> ``a/ck.prev.pt``)."""
    root, ext = osp.splitext(path)
    return f"{root}.prev{ext}"


def save_checked(path: str, obj: Any, keep_previous: bool = False) -> None:
    r"""``torch.save`` ``obj`` to ``path`` behind a header with its size and SHA-256, atomically.

    With ``keep_previous`` an existing ``path`` is first moved to :func:`previous_path`, so a
    reader can fall back to it if the newest file turns out corrupt. ``obj`` should hold only
    tensors, plain containers, numbers, strings and :data:`SAFE_GLOBALS` (what
    :func:`load_checked` accepts); this is checked here, before anything is written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    try:  # refuse to write what could not be read back
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"save_checked({path!r}): the object holds types that load_checked would refuse "
                         f"({_first_line(e)}); store tensors, plain containers, numbers and strings") from None
    header = json.dumps({"version": FORMAT_VERSION, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header + payload)

    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not keep_previous:
        atomic_write(path, write)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if osp.exists(path):  # a second name for the current file, then rename: `path` never disappears
            prev_tmp = f"{previous_path(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links on this file system
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_checked(path: str, map_location: Any = "cpu") -> Any:
    r"""Load a file written by :func:`save_checked`, or raise.

    Raises:
        CorruptFileError: ``path`` is empty, truncated, fails its SHA-256, has no valid header
            (e.g. a plain ``torch.save`` file), or its verified payload does not parse.
        UnsafeFileError: the payload wants a global outside the allowlist (a crafted pickle).
            Nothing from the file is executed in either case.
        FileNotFoundError: ``path`` does not exist.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) == 0:
        raise CorruptFileError(f"{path}: empty file (0 bytes); it was not written completely")
    if not raw.startswith(MAGIC):
        kind = "a plain torch.save/pickle file" if raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80" else \
            "not a file written by torch_geometric_bsa"
        raise CorruptFileError(f"{path}: no checksum header ({kind}); refusing to load it unchecked")
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + _HEADER_MAX)
    try:
        if end < 0:
            raise ValueError("no header line")
        header = json.loads(raw[len(MAGIC):end].decode())
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: corrupt header ({_first_line(e)})") from None
    payload = raw[end + 1:]
    if len(payload) != size:
        raise CorruptFileError(f"{path}: truncated or padded: the header promises {size} bytes of data, "
                               f"the file holds {len(payload)}")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CorruptFileError(f"{path}: checksum mismatch (SHA-256 {actual[:16]}..., header says "
                               f"{digest[:16]}...): the file is corrupt")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: refused: the file asks to build objects outside the allowlist, "
                              f"which could run code ({_first_line(e)})") from None
    except Exception as e:  # a checksum-valid payload that torch cannot parse
        raise CorruptFileError(f"{path}: unreadable payload ({type(e).__name__}: {_first_line(e)})") from None


# ------------------------------------------------------------------------------------------------
# Leftovers of killed writers, and output-folder locks
# ------------------------------------------------------------------------------------------------
_TEMP_RE = re.compile(r".+\.tmp-?(\d+)(?:-[0-9a-f]{8})?$")


def pid_alive(pid: int) -> bool:
    r"""Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str, prefix: str = "") -> List[str]:
    r"""Remove the temporary files that writers killed mid-write left in ``folder``
    (``*.tmp-<pid>-<hex>`` and ``*.tmp<pid>``, with ``<pid>`` no longer running; only names that
    start with ``prefix``); returns their paths."""
    removed = []
    if not osp.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = _TEMP_RE.fullmatch(name) if name.startswith(prefix) else None
        if m is None or pid_alive(int(m.group(1))):
            continue
        path = osp.join(folder, name)
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


class DirLock:
    r"""An exclusive lock on a folder: the file ``folder/.lock`` holds the owner's pid and host.

    ``acquire()`` creates it atomically (a hard link of a complete temporary file, which fails if
    the lock exists). An existing lock whose pid no longer runs on this host is stale and taken
    over (``on_stale`` is told); a live one raises :class:`LockError` naming the owner. A lock from
    another host cannot be checked and is never taken over. Usable as a context manager."""

    def __init__(self, folder: str, name: str = ".lock"):
        self.folder, self.path = folder, osp.join(folder, name)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def _read(self) -> Optional[Dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def acquire(self, on_stale: Callable[[str], None] = lambda msg: None) -> "DirLock":
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                other = self._read()
                if other is None:  # released meanwhile: try again
                    continue
                pid, host = other.get("pid"), other.get("host")
                if host == self.info["host"] and isinstance(pid, int) and not pid_alive(pid):
                    on_stale(f"{self.path}: taking over a stale lock of pid {pid}, which no longer runs")
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                if not other:
                    raise LockError(f"{self.folder} is locked ({self.path} is unreadable); if no other run "
                                    f"uses this folder, remove {self.path}")
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
                raise LockError(f"{self.folder} is in use by another run (pid {pid} on {host}, started "
                                f"{started}); wait for it, choose another folder, or remove {self.path} "
                                f"if that run is gone")
            raise LockError(f"could not lock {self.folder}: {self.path} keeps changing")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        if self.held:
            self.held = False
            if (self._read() or {}).get("pid") == self.info["pid"]:
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
