"""Compiling the ``cuda_paged`` kernels at first use.

``pip install kvloom`` builds nothing: the CUDA sources in ``csrc/`` ship with the
package and are compiled the first time a ``cuda_paged`` engine starts, with
``torch.utils.cpp_extension`` (nvcc and ninja), for the device's own architecture.
The build lives under ``<kvloom cache dir>/cuda_paged/<hash>-sm<arch>``, the hash
covering the sources, torch's version and its CUDA version, so a later start loads
it in well under a second, a changed source or torch builds anew, and two ranks
starting together share one build (torch holds a lock in the build directory).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import ModuleType

import torch

from kvloom.config import cache_dir

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("paged_attention.cpp", "paged_attention_kernels.cu")
HEADERS = ("paged_attention.h",)

# Built modules by build key: a process loads each build once.
_BUILT: dict[str, ModuleType] = {}


def missing_build_tools() -> list[str]:
    """Why the kernels cannot be compiled on this machine; empty when they can."""
    from torch.utils import cpp_extension

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("the CUDA toolkit (nvcc) was not found: set CUDA_HOME")
    elif not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        reasons.append(f"no nvcc in {cpp_extension.CUDA_HOME}/bin")
    if not cpp_extension.is_ninja_available():
        reasons.append("ninja is not installed (pip install ninja)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        reasons.append("no C++ compiler (c++ or g++) on the PATH")
    return reasons


def build_key(arch: str) -> str:
    """``<hash>-sm<arch>``: what a build depends on."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(f"torch {torch.__version__} cuda {torch.version.cuda}".encode())
    return f"{digest.hexdigest()[:16]}-sm{arch}"


def load_kernels(device: torch.device) -> ModuleType:
    """The compiled kernels for ``device``'s architecture, built if not yet cached."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    key = build_key(arch)
    if key in _BUILT:
        return _BUILT[key]
    from torch.utils.cpp_extension import load

    build_directory = cache_dir() / "cuda_paged" / key
    build_directory.mkdir(parents=True, exist_ok=True)
    try:
        module = load(
            name="kvloom_cuda_paged_" + key.replace("-", "_"),
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            build_directory=str(build_directory),
            extra_cflags=["-O3"],
            # Naming the architecture keeps torch from adding its own list of them.
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            verbose=False)
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(f"cuda_paged: compiling its kernels in {build_directory} failed "
                           f"(the compiler's log is above): {exc}") from exc
    _BUILT[key] = module
    return module
