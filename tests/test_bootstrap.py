"""tools/bootstrap.py never lets pip pull CUDA packages onto a machine without a GPU."""
import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bootstrap", Path(__file__).parents[1] / "tools" / "bootstrap.py")
bootstrap = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bootstrap)


def fake_pip(report_names, calls, version="24.0"):
    def run(*cmd, capture=False):
        calls.append(cmd)
        if "--version" in cmd:
            return f"pip {version} from /somewhere (python 3.10)"
        if "--dry-run" in cmd:
            return json.dumps({"install": [{"metadata": {"name": n}} for n in report_names]})
        return ""
    return run


def test_refuses_when_pip_would_fetch_cuda_packages(monkeypatch):
    calls = []
    monkeypatch.setattr(bootstrap, "run", fake_pip(["torch", "nvidia-cublas-cu12", "nvidia-cudnn-cu12"], calls))
    with pytest.raises(SystemExit, match="refusing to install torch==2.13.0.*nvidia-cublas-cu12"):
        bootstrap.install_cpu_torch(["python", "-m", "pip"])
    assert all("--dry-run" in c for c in calls if "install" in c), "it installed something after seeing CUDA packages"


def test_installs_the_cpu_build_when_the_dry_run_is_clean(monkeypatch):
    calls = []
    monkeypatch.setattr(bootstrap, "run", fake_pip(["torch", "sympy", "filelock"], calls))
    bootstrap.install_cpu_torch(["python", "-m", "pip"])
    assert calls[-1][-1] == "torch==2.13.0" and "--dry-run" not in calls[-1]


def test_an_installed_torch_is_reused(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bootstrap, "run", fake_pip([], calls))
    monkeypatch.setattr(bootstrap, "torch_version", lambda py: (2, 13))
    monkeypatch.setattr(bootstrap.sys, "argv", ["bootstrap.py", str(tmp_path / "venv")])
    monkeypatch.setattr(bootstrap.venv, "EnvBuilder", lambda **kw: type("B", (), {"create": lambda self, t: None})())
    bootstrap.main()
    assert not any("torch" in " ".join(c) and "install" in c and "-e" not in c for c in calls), calls


def test_a_pip_too_old_for_the_dry_run_report_is_upgraded_first(monkeypatch):
    calls = []
    monkeypatch.setattr(bootstrap, "run", fake_pip(["torch"], calls, version="21.2.3"))
    bootstrap.install_cpu_torch(["python", "-m", "pip"])
    installs = [c for c in calls if "install" in c]
    assert installs[0][-1] == "pip>=22.2" and "--dry-run" in installs[1], calls
    calls.clear()
    monkeypatch.setattr(bootstrap, "run", fake_pip(["torch"], calls, version="22.2"))
    bootstrap.install_cpu_torch(["python", "-m", "pip"])
    assert not any("pip>=22.2" in c for c in calls), calls
