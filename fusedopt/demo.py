"""`make demo`: the same training run with torch.optim.AdamW and with fusedopt.AdamW.

Trains a small MLP on scikit-learn's 8x8 digits (shipped inside the package, no download)
twice from the same initial weights and batches, prints both runs' final losses, test
accuracy and mean optimizer-step time side by side, and exits non-zero if the two runs do
not agree to float tolerance.

    python -m fusedopt.demo [--epochs N] [--backend auto|triton|reference]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import fusedopt


def load_digits(device):
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return [t.to(device) for t in (x_tr, y_tr, x_te, y_te)]


def make_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256),
        torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 10),
    ).to(device)


def train(model, opt, data, epochs, batch, label, progress):
    x_tr, y_tr, x_te, y_te = data
    gen = torch.Generator().manual_seed(1)
    losses, step_times = [], []
    steps_per_epoch = -(-len(x_tr) // batch)
    with progress(total=epochs * steps_per_epoch, desc=f"{label:>18}", unit="step", leave=True,
                  mininterval=1.0) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x_tr), generator=gen).to(x_tr.device)
            for i in range(0, len(x_tr), batch):
                idx = order[i:i + batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                loss.backward()
                if x_tr.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                opt.step()
                if x_tr.is_cuda:
                    torch.cuda.synchronize()
                step_times.append(time.perf_counter() - start)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    # The first steps pay for allocation and compilation: time the steady state.
    steady = step_times[len(step_times) // 10:]
    return dict(losses=losses, accuracy=accuracy, step_ms=1e3 * sum(steady) / len(steady))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=fusedopt._backend.BACKENDS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm as progress
    except ImportError:  # the bar is a nicety, not a dependency of the result
        args.no_progress = True
    if args.no_progress:
        from contextlib import nullcontext

        def progress(**kwargs):
            return nullcontext(type("Bar", (), {"update": lambda *a: None, "set_postfix": lambda *a, **k: None})())

    device = torch.device(args.device)
    data = load_digits(device)
    base = make_model(device)
    runs = {}
    for label, cls in (("torch.optim.AdamW", torch.optim.AdamW), ("fusedopt.AdamW", fusedopt.AdamW)):
        model = copy.deepcopy(base)
        kwargs = {"backend": args.backend} if cls is fusedopt.AdamW else {}
        opt = cls(model.parameters(), lr=2e-3, weight_decay=0.05, **kwargs)
        runs[label] = train(model, opt, data, args.epochs, args.batch, label, progress)
        runs[label]["params"] = [p.detach().clone() for p in model.parameters()]
        if cls is fusedopt.AdamW:
            opt._group_buckets(0)
            path = opt._buckets[0][1][0].path

    ref, new = runs["torch.optim.AdamW"], runs["fusedopt.AdamW"]
    print()
    print(f"{'':24}{'torch.optim.AdamW':>20}{'fusedopt.AdamW':>20}")
    print(f"{'final loss':24}{ref['losses'][-1]:>20.6f}{new['losses'][-1]:>20.6f}")
    print(f"{'mean of last 10 losses':24}{sum(ref['losses'][-10:]) / 10:>20.6f}{sum(new['losses'][-10:]) / 10:>20.6f}")
    print(f"{'test accuracy':24}{ref['accuracy']:>20.4f}{new['accuracy']:>20.4f}")
    print(f"{'mean step time (ms)':24}{ref['step_ms']:>20.3f}{new['step_ms']:>20.3f}")
    print(f"fusedopt path on {device.type}: {path}  (steps: {len(ref['losses'])}, device: {device})")

    loss_gap = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(ref["losses"], new["losses"]))
    param_gap = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                    for a, b in zip(ref["params"], new["params"]))
    agree = loss_gap < 1e-4 and param_gap < 1e-4 and ref["accuracy"] == new["accuracy"]
    print(f"largest relative gap: loss {loss_gap:.2e}, parameters {param_gap:.2e}")
    if not agree:
        print("FAIL: fusedopt.AdamW and torch.optim.AdamW disagree beyond float tolerance (1e-4)", file=sys.stderr)
        return 1
    print("OK: the two runs agree to float tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
