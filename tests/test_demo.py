"""The main job runs, agrees with torch, and says so; and it fails loudly when it does not."""

from fusedopt import demo


def test_demo_runs_and_agrees(capsys):
    assert demo.main(["--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK: the two runs agree" in out and "test accuracy" in out


def test_demo_fails_loudly_on_disagreement(monkeypatch, capsys):
    real = demo.train

    def skewed(model, opt, *args, **kwargs):
        result = real(model, opt, *args, **kwargs)
        if type(opt).__module__.startswith("fusedopt"):
            result["losses"][-1] *= 1.01
        return result

    monkeypatch.setattr(demo, "train", skewed)
    assert demo.main(["--epochs", "1", "--no-progress"]) == 1
    assert "FAIL" in capsys.readouterr().err
