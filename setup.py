"""Build of the ``random_ltd`` package and its ``random_ltd._C`` extension.

torch must already be importable when this runs (the extension is compiled against the installed torch), so install
without build isolation::

    pip install --no-build-isolation -e .

Which extension gets built is decided from the toolchain, never from whether a GPU is present (a GPU-less build box
must still be able to build CUDA kernels):

* CUDA extension (CPU + CUDA kernels, ``-DWITH_CUDA``) when ``nvcc`` is found AND torch is a CUDA build
  (``torch.version.cuda``), or when ``RANDOM_LTD_FORCE_CUDA=1``.
* CPU extension otherwise, or when ``RANDOM_LTD_SKIP_CUDA_BUILD=1``.
* No extension at all with ``RANDOM_LTD_SKIP_BUILD=1`` (pure Python; ``random_ltd.ops._extension`` JIT-compiles the
  kernels at first use, or falls back to the torch backend).

``RANDOM_LTD_CUDA_ARCHS`` lists the CUDA architectures, ``;``- or ``,``-separated (default ``8.0;9.0``); the last one
also gets PTX so newer GPUs can JIT it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import find_namespace_packages, setup


def _load_toolchain():
    """random_ltd/ops/_toolchain.py by path: the build facts it shares with the JIT fallback, no package import."""
    path = Path(__file__).resolve().parent / "random_ltd" / "ops" / "_toolchain.py"
    spec = importlib.util.spec_from_file_location("_random_ltd_toolchain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tc = _load_toolchain()
_flag, _nvcc_found = _tc.env_flag, _tc.nvcc_found
CPU_SOURCES, CUDA_SOURCES = list(_tc.CPU_SOURCES), list(_tc.CUDA_SOURCES)


def _gencode_flags(archs: str) -> list[str]:
    """``"8.0;9.0"`` -> ``-gencode`` flags for sm_80 and sm_90, plus PTX of the last one."""
    nums = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not nums:
        raise ValueError(f"RANDOM_LTD_CUDA_ARCHS={archs!r} names no architecture")
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    flags.append(f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}")
    return flags


def _extensions() -> tuple[list, dict]:
    if _flag("RANDOM_LTD_SKIP_BUILD"):
        print("random_ltd: RANDOM_LTD_SKIP_BUILD=1, building no extension (pure Python install)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        raise RuntimeError(
            "random_ltd's extension is compiled against the installed torch: install torch first, then "
            "`pip install --no-build-isolation -e .` (or set RANDOM_LTD_SKIP_BUILD=1 for a pure Python install)"
        ) from exc

    cxx_flags, link_flags = list(_tc.CXX_FLAGS), list(_tc.LINK_FLAGS)
    want_cuda = _flag("RANDOM_LTD_FORCE_CUDA") or (
        not _flag("RANDOM_LTD_SKIP_CUDA_BUILD") and torch.version.cuda is not None and _nvcc_found()
    )
    if want_cuda:
        archs = os.environ.get("RANDOM_LTD_CUDA_ARCHS", "8.0;9.0")
        print(f"random_ltd: building the CUDA extension (archs {archs})")
        ext = CUDAExtension(
            name="random_ltd._C",
            sources=CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *_gencode_flags(archs)]},
            extra_link_args=link_flags,
        )
    else:
        print(f"random_ltd: building the CPU extension (torch.version.cuda={torch.version.cuda}, "
              f"nvcc found={_nvcc_found()})")
        ext = CppExtension(
            name="random_ltd._C", sources=CPU_SOURCES, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension}


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """install_requires and extras_require from requirements.txt (one place for the supported ranges)."""
    core, extras = ["torch>=2.13"], {}
    for line in (Path(__file__).resolve().parent / "requirements.txt").read_text().splitlines():
        req, _, tag = line.partition("#")
        req, tag = req.strip(), tag.strip()
        if not req:
            continue
        if tag.startswith("core"):
            core.append(req)
        elif tag.startswith("extra:"):
            extras.setdefault(tag.split()[1], []).append(req)
        else:
            raise ValueError(f"requirements.txt: {line!r} has no '# core' or '# extra: NAME' tag")
    extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
    return core, extras


ext_modules, cmdclass = _extensions()
install_requires, extras_require = _requirements()

setup(
    name="random_ltd",
    version="0.1.0",
    description="Random layerwise token dropping (random-LTD) for PyTorch, with CPU and CUDA kernels",
    python_requires=">=3.11",
    # Namespace discovery: picks up every folder under random_ltd/ whether or not it has an __init__.py yet.
    packages=find_namespace_packages(include=["random_ltd", "random_ltd.*"]),
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
