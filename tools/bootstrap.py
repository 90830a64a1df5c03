"""Create the project's virtual environment: `python3 tools/bootstrap.py .venv`.

Rules, in order:
1. The venv sees the system's site-packages, so an installed torch >= 2.4 is reused as is.
2. Without a usable torch, a machine with no CUDA/ROCm GPU gets the CPU build
   (torch==2.13.0). Before installing, a dry run lists what pip would fetch, and the
   bootstrap refuses if that includes CUDA packages: pointing `PIP_INDEX_URL` (or
   `FUSEDOPT_TORCH_INDEX`) at a CPU wheel index is the remedy it prints.
3. A machine with a GPU gets pip's default torch build for that platform.
4. Then the package itself, editable, with its test and demo extras.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

CPU_TORCH = "torch==2.13.0"
MIN_TORCH = (2, 4)


def run(*cmd: str, capture: bool = False) -> str:
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else ""


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") or shutil.which("rocm-smi"):
        return True
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


def torch_version(py: str) -> tuple[int, ...] | None:
    probe = "import torch, sys; sys.stdout.write(torch.__version__.split('+')[0])"
    try:
        text = subprocess.run([py, "-c", probe], check=True, text=True, capture_output=True).stdout
    except subprocess.CalledProcessError:
        return None
    return tuple(int(x) for x in text.split(".")[:2] if x.isdigit())


def install_cpu_torch(pip: list[str]) -> None:
    # The dry run's list (`--report`) is pip 22.2's; the pip a venv is made with is the one
    # its Python shipped with (3.10.0's is 21.2), so an older one is brought up to it first.
    version = run(*pip, "--version", capture=True).split()[1]
    if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (22, 2):
        run(*pip, "install", "--quiet", "pip>=22.2")
    extra = []
    if os.environ.get("FUSEDOPT_TORCH_INDEX"):
        extra = ["--index-url", os.environ["FUSEDOPT_TORCH_INDEX"]]
    report = json.loads(run(*pip, "install", "--dry-run", "--quiet", "--report", "-", *extra, CPU_TORCH, capture=True))
    names = [item["metadata"]["name"].lower() for item in report.get("install", [])]
    cuda = [n for n in names if n.startswith(("nvidia-", "triton-rocm", "pytorch-triton-rocm"))]
    if cuda:
        sys.exit(
            f"bootstrap: refusing to install {CPU_TORCH}: on this machine without a GPU pip would also "
            f"fetch CUDA packages ({', '.join(sorted(cuda)[:4])}, ...).\n"
            "help: set FUSEDOPT_TORCH_INDEX (or PIP_INDEX_URL) to a CPU-only torch wheel index and run again."
        )
    run(*pip, "install", "--quiet", *extra, CPU_TORCH)


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv")
    py = str(target / "bin" / "python")
    if not Path(py).exists():
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(target)
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    have = torch_version(py)
    if have is not None and have >= MIN_TORCH:
        print(f"bootstrap: reusing installed torch {'.'.join(map(str, have))}")
    elif has_gpu():
        run(*pip, "install", "--quiet", "torch")
    else:
        install_cpu_torch(pip)
    run(*pip, "install", "--quiet", "-e", ".[test,demo]")


if __name__ == "__main__":
    main()
