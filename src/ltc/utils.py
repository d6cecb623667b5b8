"""Small shared helpers: atomic file writes, RNG seeding/state, distributed info, device selection, the environment
a run was made in."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
    "is_main_process",
    "world_size",
    "rank",
    "resolve_device",
    "cpu_name",
    "environment",
    "source_commit",
]


# --------------------------------------------------------------------------- atomic writes


def _wrap_os_error(exc: OSError, path: Path, what: str) -> OSError:
    """Same OSError subclass and errno as ``exc``, whose ``str()`` is a plain message naming ``path``.

    (``filename`` and ``strerror`` stay unset: with them ``str()`` would read
    ``[Errno 28] could not write ...: 'PATH'``, the path twice.)
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    msg = f"could not write {what} to {path}: {reason}; the previous file is unchanged"
    try:
        new = type(exc)(msg)
    except Exception:  # exotic subclass constructors
        new = OSError(msg)
    new.errno = exc.errno
    return new


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (True when that cannot be told)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or the platform cannot tell
    return True


def _host_tag() -> str:
    """8 hex digits naming this machine (or container), so that pids are only compared on the machine that
    owns them (a shared network folder may hold the temp files of writers on other machines)."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:8]


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _remove_stale_temps(path: Path) -> None:
    """Delete the temp files that writers of ``path`` killed mid-write (SIGKILL, power loss) left behind.

    Temp files are named ``.<name>.<host>-<pid>.<random>.tmp``; one is stale when it was made on this machine by
    a process that no longer exists. Temp files of live processes (a concurrent writer) and of other machines
    are left alone. Best effort: errors are ignored.
    """
    prefix, host = f".{path.name}.", _host_tag()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        owner = name[len(prefix):].split(".", 1)[0]
        tag, _, pid = owner.partition("-")
        if tag != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def _atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None], what: str) -> None:
    """Write via ``writer(fileobj)`` to a temp file next to ``path``, fsync, then ``os.replace``.

    On any error the temp file is removed and the previous content of ``path`` (if any) is kept. A process
    killed mid-write (SIGKILL) cannot remove its temp file ``.<name>.<host>-<pid>.<random>.tmp``; the next write
    of the same ``path`` deletes such leftovers of dead processes. ``OSError`` is re-raised with a message that
    names ``path``; other exceptions propagate as is.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file stands where a folder of the path should be
            blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()),
                           path.parent)
            raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder") from None
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
            os.chmod(tmp, mode)  # mkstemp creates 0600 files
        except OSError:
            pass
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _wrap_os_error(exc, path, what) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so that the rename itself is durable (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (parent directories are created)."""
    _atomic_write(path, lambda f: f.write(data), "file")


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``."""
    data = text.encode(encoding)
    _atomic_write(path, lambda f: f.write(data), "file")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` done atomically: a crash or error never leaves a truncated file.

    Raises:
        OSError: (same subclass/errno as the cause) "could not write checkpoint to PATH: REASON;
            the previous file is unchanged" on permission, disk-full or similar errors.
    """
    _atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices).

    With ``deterministic=True`` also request deterministic torch/cuDNN kernels (slower; some
    ops then raise if they have no deterministic implementation).
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def get_rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy, torch CPU (and CUDA, when available) global RNG states.

    Only plain containers, numbers, strings and tensors are used, so the dict can be stored in a
    checkpoint and read back with ``torch.load(..., weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`get_rng_state` (missing entries are left untouched)."""
    if "python" in state:
        py = state["python"]
        version, internal, gauss = py
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        npst = state["numpy"]
        keys = npst["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                npst["kind"],
                keys.astype(np.uint32),
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


# --------------------------------------------------------------------------- distributed


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes in the default ``torch.distributed`` group (1 when not initialised)."""
    return torch.distributed.get_world_size() if _dist_ready() else 1


def rank() -> int:
    """Global rank of this process (0 when ``torch.distributed`` is not initialised)."""
    return torch.distributed.get_rank() if _dist_ready() else 0


def is_main_process() -> bool:
    """True on global rank 0 (always true without ``torch.distributed``)."""
    return rank() == 0


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None``/a name/a ``torch.device`` into a usable ``torch.device``.

    ``"auto"`` and ``None`` select ``cuda`` when available, else ``cpu``.

    Raises:
        ValueError: for an unknown device string, or a CUDA device that is not available.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def read_json(path: str | os.PathLike[str], hint: str = "") -> dict[str, Any]:
    """Read a JSON object; a ``FileNotFoundError`` or a ``ValueError`` naming the file (and ``hint``) otherwise."""
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not valid JSON ({exc}){'; ' + hint if hint else ''}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} holds a JSON {type(data).__name__}, expected an object{'; ' + hint if hint else ''}")
    return data


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy / 0-d torch scalars as Python numbers, tuples as lists, dict keys as strings, and NaN / inf
    as ``None`` (strict JSON), recursively."""
    import math

    import numpy as np

    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- environment
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows; ``'unknown'``)."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def source_commit(package_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The short git commit of the checkout whose ``src/ltc`` is ``package_dir`` (default: this ``ltc``'s, as an
    editable install has it); ``None`` for an installed wheel, outside a checkout or without git. Uncommitted changes
    to the tracked files under ``src/`` add ``+dirty`` (other files, such as benchmark results, do not). Read-only
    for git (no index lock), once per process for this ``ltc`` (:func:`_this_commit`)."""
    import subprocess

    here = Path(package_dir or Path(__file__).parent).resolve()

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True,
                              timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or (Path(top.stdout.strip()) / "src" / "ltc").resolve() != here:
            return None
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(here.parent)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


@functools.cache
def _this_commit() -> str | None:
    """:func:`source_commit` of this ``ltc``, asked once per process (at its first record), not at every write."""
    return source_commit()


def environment() -> dict[str, Any]:
    """What made a record, for its reader: ``{ltc, commit, torch, python, platform, cpu, cpu_count, date}``;
    ``commit`` is the source checkout's (:func:`source_commit`; ``None`` for an installed wheel), ``date`` UTC
    (``YYYY-MM-DD HH:MM UTC``). The same settings need not repeat a curve bit for bit on another CPU or torch: this
    says which one it was."""
    import datetime as dt
    import platform

    from . import __version__

    return {"ltc": __version__, "commit": _this_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
