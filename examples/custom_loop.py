"""LTC inside your own training loop: the prepare / step / convert lifecycle.

    python examples/custom_loop.py

1. ``comp = ltc.LTC(model, example_input, target_sr=3)`` records the layer sizes; ``comp.start()`` runs the first
   C step on the reference weights (``penalty()`` would run it too).
2. Your loop adds ``comp.penalty()`` to the loss (the L step); ``comp.step()`` after each L step
   (C step, multiplier update, μ grows).
3. ``comp.compressed_model()`` returns the network with each conv replaced by three real convs;
   ``ltc.recalibrate_batchnorm`` then re-estimates its BatchNorm statistics on training images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ltc
from ltc.data import build, calibration_loader, loaders
from ltc.models import create


def main() -> None:
    torch.manual_seed(0)
    bundle = build("digits")  # bundled real data: scikit-learn's handwritten digits, 16x16
    train_dl, val_dl = loaders(bundle, batch_size=64)
    model = create("small_cnn", num_classes=10, in_channels=1, width=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):  # an ordinary base training
        for x, y in train_dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    x0 = next(iter(train_dl))[0][:1]
    comp = ltc.LTC(model, x0, target_sr=3.0, mu0=1e-3, mu_growth=1.5)
    comp.start()
    for step in range(5):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        for x, y in train_dl:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y) + comp.penalty()
            loss.backward()
            opt.step()
        comp.step()
        print(f"step {step + 1}: SR {comp.sr:.2f}  CR {comp.cr:.2f}  λ {comp.lam:.3g}  μ {comp.mu:.3g}  "
              f"|W-Θ|/|W| {comp.distance():.3g}")

    small = comp.compressed_model()
    ltc.recalibrate_batchnorm(small, calibration_loader(bundle))  # statistics of the new layers' outputs
    small.eval()
    correct = sum(int((small(x).argmax(1) == y).sum()) for x, y in val_dl)
    print("ranks:", comp.ranks)
    print(f"compressed: {ltc.profile(small, x0).macs:,} MACs per sample, val acc {correct / len(bundle.val):.3f}")


if __name__ == "__main__":
    main()
