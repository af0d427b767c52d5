"""Build the CUDA baselines (causal_conv1d, and mamba_ssm's Mamba-1 selective scan) for this machine's GPU only.

    python benchmarks/tools/build_cuda_baselines.py --sdists wheels/ --output /tmp/cuda_baselines \\
        --only causal_conv1d_cuda
    # transformers' Mamba-2 on its fast path: mamba_ssm's Triton parts (source folder + the stub of
    # benchmarks/README.md) and the causal_conv1d build
    PYTHONPATH=/tmp/cuda_baselines:/tmp/mamba_ssm-2.3.2.post1:/tmp/stubs python benchmarks/timing/training.py
    # with selective_scan_cuda built too (drop the stub), the Mamba-1 CUDA baseline
    PYTHONPATH=/tmp/cuda_baselines python benchmarks/timing/scans.py --cases mamba1

Both projects ship only source packages whose setup.py compiles for about ten GPU architectures. This script
unpacks ``causal_conv1d-*.tar.gz`` and ``mamba_ssm-*.tar.gz`` from ``--sdists`` (``pip download --no-deps
--no-binary :all:`` fetches them; mamba_ssm's with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` and ``--no-build-isolation``, or
its setup.py tries to compile while pip reads its metadata), compiles their extensions ``causal_conv1d_cuda`` and
``selective_scan_cuda`` with the compiler flags of their setup.py but for the local GPU's architecture alone, and
puts the extensions and both Python packages in ``--output``. It needs nvcc and a CUDA GPU.

mamba_ssm's selective scan is built for what the benchmarks time, bfloat16 inputs with float32 weights: its
dispatch (selective_scan.cpp) narrowed to that pair and one instantiation each of the forward and backward kernels,
in place of nine files for every input and weight type, which had not finished compiling within 7 minutes on the
device tool's 16-core H200 machine (causal_conv1d built within those 7 minutes). Other dtypes raise a clear error.
"""

import argparse
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

# The nvcc flags both setup.py files use, less their architecture list.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "--threads", "4",
]

# extension name -> (source package prefix, its Python package, sources and include folder inside the package)
EXTENSIONS = {
    "causal_conv1d_cuda": (
        "causal_conv1d", "causal_conv1d",
        ["csrc/causal_conv1d.cpp", "csrc/causal_conv1d_fwd.cu", "csrc/causal_conv1d_bwd.cu",
         "csrc/causal_conv1d_update.cu"],
        "csrc",
    ),
    # Written by bf16_selective_scan_sources.
    "selective_scan_cuda": ("mamba_ssm", "mamba_ssm", [], "csrc/selective_scan"),
}

# selective_scan.cpp's dtype dispatch, narrowed: the macro names it uses, and what they become.
NARROW_DISPATCH = """
#define DISPATCH_BF16_INPUTS(ITYPE, NAME, ...)                                                         \\
    if (ITYPE == at::ScalarType::BFloat16) { using input_t = at::BFloat16; __VA_ARGS__(); }           \\
    else { AT_ERROR(#NAME, " was built for bfloat16 inputs only (benchmarks/tools/build_cuda_baselines.py)"); }
#define DISPATCH_FLOAT_WEIGHTS(WTYPE, NAME, ...)                                                       \\
    if (WTYPE == at::ScalarType::Float) { using weight_t = float; __VA_ARGS__(); }                   \\
    else { AT_ERROR(#NAME, " was built for float32 weights only (benchmarks/tools/build_cuda_baselines.py)"); }
"""


def bf16_selective_scan_sources(source_root: Path) -> list[str]:
    """mamba_ssm's selective scan for bfloat16 inputs and float32 weights only (see the module's docstring): a copy
    of selective_scan.cpp whose dispatch takes only that pair, and two files instantiating its forward and backward
    kernels for it. Returns the sources, relative to ``source_root``."""
    folder = source_root / "csrc/selective_scan"
    cpp = (folder / "selective_scan.cpp").read_text()
    narrowed = re.sub(r"DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16\((?=u\.scalar_type)", "DISPATCH_BF16_INPUTS(", cpp)
    narrowed = re.sub(r"DISPATCH_WTYPE_FLOAT_AND_COMPLEX\((?=A\.scalar_type)", "DISPATCH_FLOAT_WEIGHTS(", narrowed)
    if narrowed.count("DISPATCH_BF16_INPUTS(") != 2 or narrowed.count("DISPATCH_FLOAT_WEIGHTS(") != 2:
        raise SystemExit("mamba_ssm's selective_scan.cpp dispatches differently than this script expects")
    include = '#include "selective_scan.h"\n'
    (folder / "selective_scan_bf16.cpp").write_text(narrowed.replace(include, include + NARROW_DISPATCH, 1))
    for direction, params in (("fwd", "SSMParamsBase"), ("bwd", "SSMParamsBwd")):
        (folder / f"selective_scan_{direction}_bf16_float.cu").write_text(
            f'#include "selective_scan_{direction}_kernel.cuh"\n\n'
            f"template void selective_scan_{direction}_cuda<at::BFloat16, float>({params} &params, "
            f"cudaStream_t stream);\n"
        )
    return [f"csrc/selective_scan/{name}" for name in
            ("selective_scan_bf16.cpp", "selective_scan_fwd_bf16_float.cu", "selective_scan_bwd_bf16_float.cu")]


def unpack(sdists: Path, prefix: str, into: Path) -> Path:
    archives = sorted(sdists.glob(f"{prefix}-*.tar.gz"))
    if not archives:
        raise SystemExit(f"no {prefix}-*.tar.gz in {sdists}: pip download --no-deps --no-binary :all: {prefix}")
    with tarfile.open(archives[-1]) as archive:
        archive.extractall(into, filter="data")
    return into / archives[-1].name.removesuffix(".tar.gz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdists", type=Path, required=True, help="folder holding the two source packages")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--only", choices=list(EXTENSIONS), nargs="+", default=list(EXTENSIONS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("building for the local GPU's architecture needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    arch = [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only:
            prefix, package, sources, include = EXTENSIONS[name]
            source_root = unpack(args.sdists, prefix, Path(scratch))
            if name == "selective_scan_cuda":
                sources = bf16_selective_scan_sources(source_root)
            build_dir = Path(scratch) / f"build_{name}"
            build_dir.mkdir()
            load(
                name=name, sources=[str(source_root / s) for s in sources], build_directory=str(build_dir),
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS + arch,
                extra_include_paths=[str(source_root / include)], verbose=False,
            )
            shutil.copy(build_dir / f"{name}.so", args.output / f"{name}.so")
            shutil.copytree(source_root / package, args.output / package, dirs_exist_ok=True)
            print(f"built {name} for sm_{major}{minor} into {args.output}")


if __name__ == "__main__":
    main()
