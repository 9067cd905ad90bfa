"""The native CPU kernel for JAX: an XLA FFI handler built from the C++ source we ship.

``csrc/bounds_ffi.cc`` is compiled with the system's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against the FFI headers of the installed jaxlib
(:func:`jax.ffi.include_dir`); nothing is downloaded. The library is cached per user
(``$PARAMBOUNDS_CACHE_DIR``, else ``$XDG_CACHE_HOME/parambounds`` or
``~/.cache/parambounds``) under a name that carries a digest of the source, the flags,
the compiler, this CPU's vector instructions and the jaxlib version, so a library of
that name was built from exactly this source, for this machine. A build writes a
temporary file of its own and renames it into place (atomic): two processes building
at once both finish, and neither ever loads half a file.

The library is loaded with :mod:`ctypes` and its handler registered with
:func:`jax.ffi.register_ffi_target` for the CPU. :func:`target` does all that once per
process, on first use (the first trace of a cost): it returns the target's name, or
``None`` when the kernel is switched off (``PARAMBOUNDS_JAX_KERNEL=jnp``), when JAX's
default backend is not the CPU (in ``auto`` mode), or when no compiler is found or the
build fails; then one warning says why, and the ``jax.numpy``
path computes the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import jax

from ..errors import BoundsError

__all__ = ["NAME", "SCALE", "SOURCE", "build", "cache_directory", "mode", "target"]

SOURCE = Path(__file__).parent / "csrc" / "bounds_ffi.cc"
#: The FFI targets' names, as registered with XLA: the cost (and gradient), the scaling.
NAME = "parambounds_bounds_cost"
SCALE = "parambounds_scale"
_MODES = ("auto", "native", "jnp")

_lock = threading.Lock()
_state: dict[str, Any] = {}


def mode() -> str:
    """``PARAMBOUNDS_JAX_KERNEL``: ``auto`` (default), ``native`` or ``jnp``.

    Raises:
        BoundsError: for any other value.
    """
    value = os.environ.get("PARAMBOUNDS_JAX_KERNEL", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise BoundsError(
            f"PARAMBOUNDS_JAX_KERNEL={value!r} is not a JAX kernel; expected one of {_MODES}"
        )
    return value


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-fno-math-errno"]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
    return flags


def cache_directory() -> Path:
    """Where the built library is kept (not created here)."""
    root = os.environ.get("PARAMBOUNDS_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "parambounds")
    return Path(root) / "jax"


def _library_path(compiler: str) -> Path:
    import jaxlib

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(repr((_flags(), compiler, jaxlib.__version__, os.uname().machine)).encode())
    return cache_directory() / f"parambounds_jax_{digest.hexdigest()[:16]}.so"


def build(compiler: str | None = None) -> Path:
    """Compile the handler into the cache (if not there yet) and return its path.

    Raises:
        BoundsError: without a compiler, or when the compiler fails (its output quoted).
    """
    compiler = compiler or _compiler()
    if compiler is None:
        raise BoundsError("no C++ compiler found (set CXX, or install g++ or clang++)")
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_flags(), "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            raise BoundsError(
                f"building the JAX kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
        os.replace(tmp, path)  # atomic: another process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> str:
    lib = ctypes.CDLL(str(build()))
    jax.ffi.register_ffi_target(NAME, jax.ffi.pycapsule(lib.ParamboundsBoundsCost), platform="cpu")
    jax.ffi.register_ffi_target(SCALE, jax.ffi.pycapsule(lib.ParamboundsScale), platform="cpu")
    _state["lib"] = lib  # kept alive for the process
    return NAME


def target() -> str | None:
    """The registered FFI target, built and loaded on first use; ``None`` when off.

    With ``PARAMBOUNDS_JAX_KERNEL=native``, a failed build raises instead of falling back.

    Raises:
        BoundsError: for an unknown ``PARAMBOUNDS_JAX_KERNEL``, or a failed build in
            ``native`` mode.
    """
    want = mode()
    if want == "jnp" or (want == "auto" and jax.default_backend() != "cpu"):
        return None  # off, or an accelerator's process: no CPU build it would not use
    with _lock:
        if "target" not in _state:
            try:
                _state["target"] = _load()
            except (BoundsError, OSError, AttributeError) as err:
                _state["target"] = None
                _state["error"] = err
                if want == "auto":
                    warnings.warn(
                        f"parambounds: the native JAX kernel is not available ({err}); "
                        "using the jax.numpy path. Set PARAMBOUNDS_JAX_KERNEL=jnp to "
                        "skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        if _state["target"] is None and want == "native":
            raise BoundsError(
                f"PARAMBOUNDS_JAX_KERNEL=native, but the kernel is not available: "
                f"{_state.get('error')}"
            )
        return _state["target"]  # type: ignore[no-any-return]
