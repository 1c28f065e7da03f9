"""How our programs compile: the persistent compile cache of the command lines, and `jit` with XLA's
CPU backend at optimisation level 2.

Why level 2 on CPU: XLA's default backend level (3) spends about a third of a train step's compile
time in LLVM work that does not speed up what runs: the matmuls are library calls (XNNPACK / Eigen),
and the element-wise fusions come out as fast at level 2, which keeps LLVM's vectorisers. Measured on
2 cores (benchmarks/README.md, "Issue 14, third measurement"): MiniLM SPAFIT and full steps ran at the
same speed (within +-1 %) and compiled 30-35 % faster; level 1 saves no more, level 0 runs twice as
slow. A level given in XLA_FLAGS (`--xla_backend_optimization_level=N`) wins, and other backends keep
their own defaults. `jax.pmap` takes no compiler options, so the pmap driver keeps XLA's default.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

CPU_OPT_LEVEL = 2
_OPT_FLAG = "xla_backend_optimization_level"
COMPILE_CACHE_ENV = "SPAFIT_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 4 * 2**30  # least recently used entries go past this (only in a folder we choose)


def compiler_options() -> dict[str, int]:
    """The options our `jit` passes: level CPU_OPT_LEVEL on the CPU backend unless XLA_FLAGS sets a level; else none."""
    if jax.default_backend() != "cpu" or _OPT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_OPT_FLAG: CPU_OPT_LEVEL}


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `compiler_options()` (the backend is read when this is called)."""
    return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)


def use_compile_cache(default: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for a command line, so that a rerun, a resume or another
    run with the same shapes loads its compiled steps instead of compiling them again.

    The folder: JAX_COMPILATION_CACHE_DIR (JAX's own setting) if set, else $SPAFIT_COMPILE_CACHE, else
    `default`, else ~/.cache/spafit_jax/jax ($XDG_CACHE_HOME is respected); SPAFIT_COMPILE_CACHE=off turns
    it off. Call before anything compiles. Returns the folder in use, or None.
    """
    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if configured:
        return str(configured)
    choice = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if choice.lower() in ("off", "0", "false", "no", "none"):
        return None
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(choice).expanduser() if choice else Path(default) if default else home / "spafit_jax" / "jax"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return str(folder)
