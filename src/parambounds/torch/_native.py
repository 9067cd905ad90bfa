"""The native CPU kernel: built from the C++ source shipped in the package, never waited for.

``csrc/bounds.cpp`` is compiled with :func:`torch.utils.cpp_extension.load` (a C++
compiler and ninja are needed; nothing is downloaded) for the vector instructions of
the machine it runs on (AVX-512, AVX2, or the portable scalar code of ``at::vec``), and
cached in ``parambounds/<torch version>/`` under PyTorch's extension folder
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). The module's name
carries a digest of the source, the flags and the torch version, so a built library
whose name matches is this source's, and it is imported directly: a process that finds
it built runs neither ninja nor PyTorch's checks (a few milliseconds instead of ~0.3 s).

A build is serialised between processes by an ``flock`` that the system releases when
its holder dies, so a build killed half-way never blocks the next one: PyTorch's own
``lock`` file, which it would wait on forever, is removed as stale while that ``flock``
is held.

No training step waits for the compiler: :func:`get` imports the library when it is
built already, and otherwise starts the build in a background thread and returns
``None`` until the module is ready, and the callers use the eager
kernel meanwhile. ``parambounds build-kernels`` (:func:`build`) builds ahead of time, so
that even the first step finds the kernel ready. Without a compiler, one warning says so
and the eager kernel stays in use. The build thread is not a daemon: a short script
that exits while the kernel is being built waits for the build to finish (instead of
being killed inside it, which aborts the interpreter); build ahead of time to avoid it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PENALTY_IDS",
    "build",
    "build_directory",
    "empty_cache",
    "get",
    "module_name",
    "state",
]

SOURCE = Path(__file__).parent / "csrc" / "bounds.cpp"
#: Penalty names the native kernel implements, and their ids in ``bounds.cpp``.
PENALTY_IDS = {"exp": 0, "expm1": 1, "quadratic": 2, "linear": 3}

_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None
_module: Any = None
_error: str | None = None


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "AVX512"
    return cap if cap in _FLAGS else "DEFAULT"


def _cflags() -> list[str]:
    return ["-O3", *_FLAGS.get(_capability(), [])]


@functools.cache
def module_name() -> str:
    """Name of the extension: this machine's vector instructions and a digest of the build.

    The digest covers the source, the compiler flags and the torch version, so a library
    of this name in :func:`build_directory` was built from exactly this source.
    """
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(repr((_cflags(), torch.__version__)).encode())
    return f"parambounds_native_{_capability().lower()}_{digest.hexdigest()[:12]}"


def _extensions_root() -> str:
    """PyTorch's extension folder, without importing ``cpp_extension`` (~0.2 s)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    try:
        from torch import _appdirs  # what cpp_extension.get_default_build_root uses

        return os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
    except (ImportError, AttributeError):  # pragma: no cover - a torch that moved it
        from torch.utils import cpp_extension

        return cpp_extension.get_default_build_root()


def build_directory() -> Path:
    """Where the extension is built and cached (created if missing)."""
    version = torch.__version__.replace("+", "_")
    path = Path(_extensions_root()) / "parambounds" / f"torch{version}" / module_name()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _built_path() -> Path:
    return build_directory() / f"{module_name()}{'.pyd' if os.name == 'nt' else '.so'}"


@contextlib.contextmanager
def _exclusive(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the build of ``directory`` for this process; clear a dead build's lock file.

    Yields whether it is held: always with ``wait``; without, only if no other process
    holds it (one that is building).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: PyTorch's own lock file only
        yield True
        return
    with open(directory / "parambounds.flock", "a") as handle:
        try:  # released by the system if this process dies
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            # Every build of this folder holds the flock, so a lock file left now is
            # from a build that was killed; PyTorch would wait for it forever.
            (directory / "lock").unlink(missing_ok=True)
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_built(path: Path) -> Any:
    """Import the extension at ``path`` directly (no ninja, no PyTorch checks)."""
    spec = importlib.util.spec_from_file_location(module_name(), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(verbose: bool = False) -> Any:
    from torch.utils import cpp_extension

    directory = build_directory()
    built = _built_path()
    with _exclusive(directory):  # held by any build: the library is complete or absent
        if built.exists() and not verbose:
            try:
                return _import_built(built)
            except ImportError:  # a library left damaged (a killed link): build it again
                built.unlink(missing_ok=True)
        return cpp_extension.load(
            name=module_name(),
            sources=[str(SOURCE)],
            extra_cflags=_cflags(),
            build_directory=str(directory),
            verbose=verbose,
        )


def _load_if_built() -> Any:
    """The library, imported now if it is built and no build is running; else ``None``."""
    built = _built_path()
    if not built.exists():
        return None
    with _exclusive(built.parent, wait=False) as held:
        if not held:
            return None
        try:
            return _import_built(built)
        except ImportError:  # damaged: the background build replaces it
            return None


def _build_now(verbose: bool) -> None:
    global _module, _error
    try:
        _module = _load(verbose)
    except Exception as err:  # no compiler, no ninja, a broken toolchain
        _error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}"
    finally:
        _done.set()


def _start() -> None:
    global _thread, _module
    with _lock:
        if _thread is None and not _done.is_set():
            # Built already (the common case after the first run): import it in this
            # thread, a few milliseconds, so that even the first step uses it.
            _module = _load_if_built()
            if _module is not None:
                _thread = threading.current_thread()
                _done.set()
                return
            _thread = threading.Thread(target=_build_now, args=(False,), name="parambounds-build")
            _thread.start()


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"parambounds: the native CPU kernel could not be built ({_error}); using the "
            "eager kernel. Run `parambounds build-kernels` to see the compiler's output.",
            RuntimeWarning,
            stacklevel=5,
        )


def get(wait: bool = False) -> Any:
    """Return the native module, or ``None`` while it is being built or when it cannot be.

    Args:
        wait: block until the build has finished (tests and ``build-kernels``).
    """
    if _module is not None:
        return _module
    _start()
    if wait:
        _done.wait()
    if _done.is_set() and _module is None:
        _warn_once()
    return _module


def build(verbose: bool = True) -> Any:
    """Build (or load from the cache) the native kernel now, in this thread.

    Returns:
        the module.

    Raises:
        RuntimeError: when it cannot be built (the compiler's message).
    """
    global _thread
    with _lock:
        if not _done.is_set() and _thread is None:
            _thread = threading.current_thread()
            _build_now(verbose)
    _done.wait()  # a build already started in the background
    if _module is None:
        raise RuntimeError(f"cannot build the native kernel: {_error}")
    return _module


def empty_cache() -> None:
    """Free the gradient memory that the native kernel keeps for the next step.

    The native kernel's gradient buffers come from a pool of their own: the buffers that
    ``.grad`` frees (``zero_grad()``, or after accumulating into kept gradients) are kept
    and serve the next step, so that no step after the first writes into fresh pages
    (a page fault per 4 KiB, which costs as much as the pass itself on some machines).
    The pool never keeps more than the most gradient memory it ever had handed out at once
    (about one step's gradients of the bounded parameters), and a model of other sizes
    takes the place of the last. Call this after training to give that memory back.

    Examples:
        >>> import parambounds
        >>> parambounds.empty_cache()
    """
    if _module is not None:
        _module.empty_cache()


def state() -> str:
    """``"ready"``, ``"building"``, ``"failed"`` or ``"idle"`` (not asked for yet)."""
    if _module is not None:
        return "ready"
    if _done.is_set():
        return "failed"
    return "building" if _thread is not None else "idle"
