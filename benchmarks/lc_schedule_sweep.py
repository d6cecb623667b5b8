"""LC schedule sweep: which schedule knobs matter for ``ltc`` at a fixed target SR, ranked on the validation split.

    python benchmarks/lc_schedule_sweep.py --quick                 # ~11 variants, minutes (quick-profile base)
    python benchmarks/lc_schedule_sweep.py --full                  # ~20 variants on the full-profile base
    python benchmarks/lc_schedule_sweep.py --smoke                 # 3 variants on the smoke base, ~1 min
    python benchmarks/lc_schedule_sweep.py --quick --dataset pneumoniamnist --model vgg16_cifar --target 5

One (dataset, model) (default CIFAR-10 / ResNet-34, target SR 10) and its base model from the same cache as
``benchmarks/quality.py`` (same profile -> same cached base; trained here if absent). Starting from the
profile's schedule (the baseline row), one knob changes at a time:

- ``mu0`` (first μ), ``mu_final`` (multiples of the automatic final μ, see ``CompressConfig.resolve_schedule``)
  and a fixed growth ``a = 1.25`` (the LC paper's: μ then ends far lower on a short run);
- the split of the fixed epoch budget between LC epochs and fine-tuning, and epochs per L step at fixed LC
  epochs;
- the LC learning rate; HOOI sweeps ``n_iter`` in the C step's projection;
- the number of LC steps (1 epoch each; this one changes the total budget: see the Budget column);
- the layer weighting (``'absolute'``: the SPEC's unweighted errors) and ``min_rank`` (a floor on every rank).

Each variant is one ``ltc.compress`` run. Rows are ranked by validation accuracy after fine-tuning (then by
accuracy before fine-tuning). Writes ``benchmarks/results/lc_schedule_sweep_{profile}_{dataset}_{model}_sr{target}``
``.{json,md}`` atomically after every variant (``--smoke``: under ``/tmp/ltc_bench_smoke``); ``--resume`` keeps
finished variants.
The validation split is also the one the quality benchmark reports on (there is no test split here), so the
winning schedule is tuned on it: treat its margin over the baseline with that in mind.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as Q  # noqa: E402  (sets the BLAS thread environment before torch/numpy load)
import torch  # noqa: E402

from ltc.utils import atomic_write_text  # noqa: E402


def variants(grid: str, c: dict[str, Any], mu_auto: float) -> list[dict[str, Any]]:
    """``[{name, axis, overrides}]``; overrides are ``ltc.compress`` keywords (``mu_final`` absolute)."""
    steps, eps, ft = c["steps"], c["epochs_per_step"], c["finetune_epochs"]
    lc = steps * eps
    budget = lc + ft
    v: list[dict[str, Any]] = [{"name": "baseline", "axis": "baseline", "overrides": {}}]

    def add(axis: str, name: str, **ov: Any) -> None:
        v.append({"name": name, "axis": axis, "overrides": ov})

    if grid == "smoke":
        add("mu0", "mu0=1e-2", mu0=1e-2)
        add("lr", f"lr={c['lr'] * 3:g}", lr=c["lr"] * 3)
        return v
    mu0s = [1e-4, 1e-2] if grid == "quick" else [1e-5, 1e-4, 1e-2]
    for m in mu0s:
        add("mu0", f"mu0={m:g}", mu0=m)
    facs = [0.1] if grid == "quick" else [0.03, 0.1, 0.3, 3.0]
    for f in facs:
        add("mu_final", f"mu_final={f:g}x auto ({f * mu_auto:.3g})", mu_final=f * mu_auto)
    add("mu_final", "growth=1.25 fixed", mu_growth=1.25)
    add("weighting", "absolute layer errors", weighting="absolute")
    for r in ([2] if grid == "quick" else [2, 4]):
        add("min_rank", f"min_rank={r}", min_rank=r)
    # split of the fixed budget between LC epochs and fine-tuning (1 epoch per L step)
    splits = [(max(1, lc // 2), budget - max(1, lc // 2))]
    if grid == "full":
        splits.append((budget - 1, 1) if budget - 1 != lc else (max(1, lc - 1), budget - max(1, lc - 1)))
        if budget - 2 not in (lc, lc // 2) and budget - 2 >= 1:
            splits.append((budget - 2, 2))
    for s_, f_ in dict.fromkeys(splits):
        if s_ * 1 != lc or f_ != ft:
            add("budget split", f"LC {s_} ep + FT {f_} ep", steps=s_, epochs_per_step=1, finetune_epochs=f_)
    # epochs per L step at fixed LC epochs
    for e in ([2] if grid == "quick" else [2, 4]):
        if lc % e == 0 and lc // e >= 2 and e != eps:
            add("epochs/step", f"{lc // e} steps x {e} ep", steps=lc // e, epochs_per_step=e)
    for lr in ([c["lr"] / 3, c["lr"] * 3] if grid == "quick" else [c["lr"] / 10, c["lr"] / 3, c["lr"] * 3]):
        add("lr", f"lr={lr:.3g}", lr=lr)
    for n in ([2] if grid == "quick" else [1, 3]):
        add("n_iter", f"n_iter={n}", n_iter=n)
    for s_ in ([steps * 2] if grid == "quick" else [max(2, steps // 2), steps * 2]):
        if s_ != steps:
            add("steps", f"{s_} steps (budget {s_ * eps + ft})", steps=s_)
    return v


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    s = doc["schedule"]
    lines = [
        f"# LC schedule sweep ({doc['profile']} grid)",
        "",
        f"- status: **{doc['status']}**, {len(rows)} variants; command `{doc['command']}`; started "
        f"{doc['date_started']}, updated {doc['date_updated']}",
        f"- {Q.DATASETS[doc['dataset']]['display']} / {Q.DISPLAY_MODEL.get(doc['model'], doc['model'])} "
        f"(width {doc['width']:g}), `ltc` at target SR {doc['target_sr']:g}; base val acc "
        f"{Q.pct(doc['base']['val_acc'])} % on {doc['base']['val_size']} validation images",
        f"- baseline schedule: {s['steps']} LC steps x {s['epochs_per_step']} epoch at lr {s['lr']}, "
        f"{s['finetune_epochs']} fine-tuning epochs at lr {s['finetune_lr']}, μ0 {s['mu0']}, automatic final μ "
        f"{doc['mu_auto']:.3g}, n_iter {s['n_iter']}",
        f"- machine: {doc['machine']['platform']}, {doc['machine']['cpu_count']} CPUs, torch "
        f"{doc['machine']['torch']}, {doc['machine']['torch_threads']} threads",
        "",
        "Ranked by validation accuracy after fine-tuning. Distance: ‖W − Θ‖/‖W‖ after the last C step (how far "
        "the trained weights still were from the deployed low-rank ones; large values mean the deployed network "
        "lost what the L steps learned, visible as a low accuracy before fine-tuning).",
        "",
        "| Rank | Variant | Knob | Budget (epochs) | μ0 → μ final | SR | CR | Acc before FT (%) | Acc (%) "
        "| Δ vs baseline (pp) | Distance | Seconds |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_acc = next((r["acc"] for r in rows if r["name"] == "baseline" and "error" not in r), None)
    for i, r in enumerate(ranked(rows), 1):
        if "error" in r:
            lines.append(f"| — | {r['name']} | {r['axis']} | | | failed: {r['error'][:100]} | | | | | | "
                         f"{r['seconds']:.0f} |")
            continue
        delta = "—" if base_acc is None else f"{100 * (r['acc'] - base_acc):+.2f}"
        lines.append(
            f"| {i} | {r['name']} | {r['axis']} | {r['budget_epochs']} | {r['mu0']:.2g} → {r['mu_last']:.3g} "
            f"| {r['sr']:.2f} | {r['cr']:.2f} | {Q.pct(r['acc_before_finetune'])} | {Q.pct(r['acc'])} | {delta} "
            f"| {r['distance']:.3g} | {r['seconds']:.0f} |")
    good = [r for r in ranked(rows) if "error" not in r]
    if good and base_acc is not None:
        se = Q.binomial_se_pp(base_acc, doc["base"]["val_size"])
        best = good[0]
        lines += ["", f"Best: **{best['name']}** ({Q.pct(best['acc'])} %, {100 * (best['acc'] - base_acc):+.2f} pp "
                      f"vs the baseline); one standard error of an accuracy on {doc['base']['val_size']} images is "
                      f"about {se:.1f} pp, so only gaps of several standard errors separate schedules. Per knob, "
                      "the best setting:"]
        axes: dict[str, dict[str, Any]] = {}
        for r in good:
            if r["axis"] != "baseline" and r["axis"] not in axes:
                axes[r["axis"]] = r
        for ax, r in axes.items():
            lines.append(f"- {ax}: {r['name']} ({100 * (r['acc'] - base_acc):+.2f} pp)")
    return "\n".join(lines) + "\n"


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: ("error" in r, -(r.get("acc") or 0.0), -(r.get("acc_before_finetune") or 0.0)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", dest="profile", action="store_const", const="quick",
                   help="quick-profile base, ~11 variants")
    g.add_argument("--full", dest="profile", action="store_const", const="full",
                   help="full-profile base, ~20 variants")
    g.add_argument("--smoke", dest="profile", action="store_const", const="smoke",
                   help="smoke-profile base, 3 variants")
    p.add_argument("--dataset", choices=list(Q.DATASETS), default="cifar10")
    p.add_argument("--model", choices=list(Q.MODELS), default="resnet34_cifar")
    p.add_argument("--target", type=float, default=10.0, help="target SR (budget mode)")
    p.add_argument("--only", nargs="+", default=None, help="run only the variants whose knob (axis) is listed")
    p.add_argument("--cache", type=Path, default=Q.DEFAULT_CACHE)
    p.add_argument("--data-dir", type=Path, default=Q.DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    threads, why = Q.choose_threads(args.threads)
    torch.set_num_threads(threads)
    settings = copy.deepcopy(Q.PROFILES[args.profile])
    out = args.out or (Q.SMOKE_OUT if args.profile == "smoke" else Q.DEFAULT_OUT)
    stem = f"lc_schedule_sweep_{args.profile}_{args.dataset}_{args.model}_sr{args.target:g}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    Q.log(f"LC schedule sweep ({args.profile}): torch {torch.__version__}, {threads} thread(s) ({why})")

    data = Q.DataCache(args.data_dir, settings, args.seed)
    ds = args.dataset
    if not data.available(ds):
        alt = next((k for k in Q.DATASETS if data.available(k)), None)
        if alt is None:
            Q.log(f"no dataset found under {args.data_dir}; nothing to do")
            return 1
        Q.log(f"{data.path(ds)} not found: using {alt} instead")
        ds = alt
    b = data.bundle(ds)
    size = Q.image_size_for(args.model, b.image_size, b.in_channels, b.num_classes)
    d = data.get(ds, size)
    base, info = Q.train_base(ds, args.model, d, settings, args.seed, args.cache)

    c = settings["compress"]
    mu_auto = Q.auto_schedule(base, d, settings, args.seed, args.target).mu_final
    plan = variants(args.profile, c, float(mu_auto))
    if args.only:
        plan = [v for v in plan if v["axis"] in args.only or v["axis"] == "baseline"]

    doc: dict[str, Any] = {
        "benchmark": "lc_schedule_sweep", "profile": args.profile, "status": "running",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": Q.machine_info(),
        "threads_reason": why, "date_started": Q.now_iso(), "date_updated": Q.now_iso(), "dataset": ds,
        "model": args.model, "width": settings["widths"][args.model], "target_sr": args.target, "seed": args.seed,
        "schedule": c, "mu_auto": float(mu_auto), "base": {k: v for k, v in info.items() if k != "history"},
        "variants": plan, "rows": [],
    }
    done: dict[str, dict[str, Any]] = {}
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text(encoding="utf-8"))
        same = all(old.get(k) == doc[k] for k in ("profile", "dataset", "model", "target_sr", "seed", "schedule"))
        if not same:
            Q.log(f"--resume: {json_path} holds another sweep (profile/dataset/model/target/schedule differ); "
                  "run without --resume to overwrite it")
            return 2
        done = {r["name"]: r for r in old.get("rows", []) if "error" not in r}
        doc["date_started"] = old.get("date_started", doc["date_started"])
        Q.log(f"--resume: {len(done)} finished variants kept")

    per = Q.estimate_row({"method": "ltc"}, Q.calibrate(args.model, d, settings, ["ltc"], args.seed), settings)
    todo = [v for v in plan if v["name"] not in done]
    Q.log(f"{len(plan)} variants ({len(todo)} to run) on {ds}/{args.model} at target SR {args.target:g}; "
          f"about {Q.fmt_s(per)} each at the baseline budget -> roughly {Q.fmt_s(per * len(todo))}")

    spec = {"kind": "sweep", "dataset": ds, "model": args.model, "method": "ltc", "target_sr": args.target,
            "lam": None, "label": "", "sweep_index": 0}
    for i, v in enumerate(plan, 1):
        if v["name"] in done:
            doc["rows"].append(done[v["name"]])
            Q.log(f"  [{i}/{len(plan)}] {v['name']}: kept")
            continue
        row = Q.run_row({**spec, "label": v["name"], "sweep_index": i}, base, info, d, settings, args.seed,
                        overrides=v["overrides"])
        rec: dict[str, Any] = {"name": v["name"], "axis": v["axis"], "overrides": v["overrides"],
                               "budget_epochs": row["budget_epochs"], "seconds": row["seconds"]}
        if "error" in row:
            rec["error"] = row["error"]
            Q.log(f"  [{i}/{len(plan)}] {v['name']}: FAILED {row['error']}")
        else:
            hist = row["history"]
            rec.update({
                "sr": row["sr"], "cr": row["cr"], "lam": row["lam"], "acc": row["compressed"]["acc"],
                "acc_before_finetune": row["compressed"]["acc_before_finetune"], "base_acc": row["base"]["acc"],
                "mu0": row["config"]["mu0"], "mu_growth": row["config"]["mu_growth"],
                "mu_last": hist[-1]["mu"] if hist else row["config"]["mu0"],
                "distance": hist[-1]["distance"] if hist else None,
                "distance_path": [h["distance"] for h in hist], "mu_path": [h["mu"] for h in hist],
                "sr_path": [h["sr"] for h in hist], "config": row["config"], "log": row["log"],
            })
            Q.log(f"  [{i}/{len(plan)}] {v['name']:<34} SR {rec['sr']:5.2f}  acc {Q.pct(rec['acc_before_finetune'])}"
                  f" -> {Q.pct(rec['acc'])} %  distance {rec['distance']:.3g}  ({row['seconds']:.0f} s)")
        doc["rows"].append(rec)
        doc["date_updated"] = Q.now_iso()
        atomic_write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
        atomic_write_text(md_path, markdown(doc))
    doc["status"] = "complete"
    doc["elapsed_s"] = time.perf_counter() - t_start
    doc["ranking"] = [r["name"] for r in ranked(doc["rows"])]
    doc["date_updated"] = Q.now_iso()
    atomic_write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(doc)
    atomic_write_text(md_path, md)
    print("\n" + md)
    Q.log(f"done in {Q.fmt_s(doc['elapsed_s'])}; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
