"""Helper process for tests/test_reliability.py and tests/test_torchrun.py (not a test module itself).

Modes (``python tests/_resume_worker.py MODE ...``):

* ``compress OUT RESULT [--resume]``: a small ``ltc.api.compress`` run (small_cnn width 0.25 on synthetic
  16x16 images whose noise augmentation draws from the global torch RNG), checkpointing into ``OUT``; prints
  ``ready`` once the imports and data are done (the tests start their kill timers then) and, at the end,
  saves the ranks, the compressed model's state_dict, the log and the history to ``RESULT``.
* ``hang-write TARGET``: writes a good checkpoint to ``TARGET`` atomically, then starts a second atomic
  write whose writer stops half way (prints ``writing`` and sleeps) so that the test can SIGKILL it mid-write.
* ``ddp OUT RESULT CLI_ARGS [:: CLI_ARGS ...]``: under torchrun (gloo, CPU): ``ltc.api.compress`` of a DDP-wrapped
  model with a ``DistributedSampler``, then each ``ltc`` command; every process saves its ranks, weights, the
  batches of every epoch and the files it wrote under ``OUT`` to ``RESULT.<rank>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

STEPS, EPOCHS_PER_STEP, FINETUNE = 3, 1, 2
TOTAL_EPOCHS = STEPS * EPOCHS_PER_STEP + FINETUNE


class NoisyImages(Dataset):
    """Ten classes of 1x16x16 images (a prototype plus fixed noise); every access adds fresh noise from the
    global torch RNG, so a resumed run only matches an uninterrupted one if the RNG state is restored."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        proto = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1234))
        self.y = torch.arange(n) % 10
        self.x = proto[self.y] + 0.8 * torch.randn(n, 1, 16, 16, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn_like(x)
        return x, self.y[i]


def base_model() -> torch.nn.Module:
    from ltc import models

    torch.manual_seed(0)
    return models.create("small_cnn", num_classes=10, in_channels=1, width=0.25)


def compress_kwargs() -> dict:
    return dict(method="ltc", target_sr=2.5, steps=STEPS, epochs_per_step=EPOCHS_PER_STEP, finetune_epochs=FINETUNE,
                lr=0.02, finetune_lr=0.01, seed=5, device="cpu", progress=False)


def save_result(res, path: str | Path) -> None:
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in res.log]
    hist = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    torch.save({"ranks": dict(res.ranks), "state": res.model.state_dict(), "log": strip, "history": hist,
                "acc": res.acc, "acc_before": res.acc_before_finetune, "base_acc": res.base_acc}, path)


def run_compress(out: str, result: str, resume: bool) -> None:
    from ltc.api import compress

    train = DataLoader(NoisyImages(768, 0, augment=True), batch_size=32, shuffle=True, generator=torch.Generator())
    val = DataLoader(NoisyImages(128, 1, augment=False), batch_size=128)
    model = base_model()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the first optimizer imports torch._dynamo (s)
    print("ready", flush=True)
    t0 = time.perf_counter()
    res = compress(model, train, val_loader=val, checkpoint_dir=out, resume=resume, **compress_kwargs())
    save_result(res, result)
    print(f"done {time.perf_counter() - t0:.3f}", flush=True)


def run_hang_write(target: str) -> None:
    from ltc.utils import _atomic_write, atomic_torch_save

    atomic_torch_save({"good": torch.arange(10)}, target)

    def writer(f) -> None:
        f.write(b"\0" * 100_000)  # half a checkpoint
        f.flush()
        print("writing", flush=True)
        time.sleep(600)

    _atomic_write(target, writer, "checkpoint")


def _watch_writes(root: str) -> list[str]:
    """Record every file opened for writing, renamed, removed or created under ``root`` by this process (an
    audit hook; it sees Python-level opens, ``os.open``/``mkstemp``, ``os.replace``, ``os.remove``, ``mkdir``)."""
    import os

    root = os.path.realpath(root)
    seen: list[str] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def under(p: object) -> str | None:
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        if not isinstance(p, str | os.PathLike):
            return None
        full = os.path.realpath(os.fspath(p))
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            hit = under(path) if writing else None
        elif event == "os.rename":
            hit = under(args[1])
        elif event in ("os.remove", "os.mkdir", "os.rmdir"):
            hit = under(args[0])
        else:
            return
        if hit:
            seen.append(f"{event} {hit}")

    sys.addaudithook(hook)
    return seen


def run_ddp(out: str, result: str, cli_argvs: list[list[str]]) -> None:
    """Under torchrun: (1) ltc.api.compress of a DDP-wrapped model with a DistributedSampler (each process its
    own half of the data) into OUT/api; (2) each ``ltc`` command (ltc.cli.main, as the console script runs it) in
    ``cli_argvs``, with ltc.compress and ltc.train.fit observed to keep each process's results (ranks, weights,
    the batches every epoch ran). Saves RESULT.<rank>."""
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DistributedSampler

    import ltc.api
    import ltc.pipelines
    import ltc.train
    from ltc.cli import main as ltc_main

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writes = _watch_writes(out)
    try:
        ds = NoisyImages(256, 0, augment=True)
        sampler = DistributedSampler(ds, shuffle=True, seed=3, drop_last=True)
        train = DataLoader(ds, batch_size=32, sampler=sampler)
        first_batch = next(iter(train))[1].tolist()
        model = nn.parallel.DistributedDataParallel(base_model())
        kw = {**compress_kwargs(), "steps": 2, "finetune_epochs": 1}
        res = ltc.api.compress(model, train, checkpoint_dir=Path(out) / "api", **kw)
        api = {"ranks": dict(res.ranks), "state": res.model.state_dict(), "first_batch": first_batch}

        seen: dict[str, object] = {}
        fits: list[list[int]] = []
        real_compress, real_fit = ltc.api.compress, ltc.train.fit

        def observed(*args, **kwargs):
            seen["res"] = real_compress(*args, **kwargs)
            return seen["res"]

        def observed_fit(*args, **kwargs):
            hist = real_fit(*args, **kwargs)
            fits.append([int(row["batches"]) for row in hist])
            return hist

        ltc.pipelines.compress, ltc.train.fit, ltc.api.fit = observed, observed_fit, observed_fit
        clis = []
        for argv in cli_argvs:
            seen.clear()
            fits.clear()
            rc = ltc_main(argv)
            cli = {"rc": rc, "batches": [list(f) for f in fits]}
            if "res" in seen:
                cli.update(ranks=dict(seen["res"].ranks), state=seen["res"].model.state_dict())
            clis.append(cli)
        torch.save({"world": dist.get_world_size(), "api": api, "cli": clis, "writes": list(writes)},
                   f"{result}.{rank}")
        dist.barrier()  # neither process tears the group down while the other may still be in a collective
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode = argv[0]
    if mode == "compress":
        run_compress(argv[1], argv[2], "--resume" in argv[3:])
    elif mode == "hang-write":
        run_hang_write(argv[1])
    elif mode == "ddp":  # commands separated by "::"
        cmds, cur = [], []
        for a in argv[3:]:
            if a == "::":
                cmds.append(cur)
                cur = []
            else:
                cur.append(a)
        run_ddp(argv[1], argv[2], [*cmds, cur] if cur else cmds)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
