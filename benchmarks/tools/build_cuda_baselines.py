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
--no-binary :all:`` fetches them), compiles their extensions ``causal_conv1d_cuda`` and ``selective_scan_cuda``
with the compiler flags of their setup.py but for the local GPU's architecture alone, and puts the extensions and
both Python packages in ``--output``. It needs nvcc and a CUDA GPU. On the device tool's 16-core H200 machine
causal_conv1d built within 7 minutes, and mamba_ssm's selective scan (ten large files) had not finished when those
7 minutes ran out.
"""

import argparse
import os
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
    "selective_scan_cuda": (
        "mamba_ssm", "mamba_ssm",
        ["csrc/selective_scan/selective_scan.cpp"]
        + [f"csrc/selective_scan/selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")]
        + [f"csrc/selective_scan/selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16")
           for k in ("real", "complex")],
        "csrc/selective_scan",
    ),
}


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
