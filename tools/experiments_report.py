#!/usr/bin/env python3
"""experiments_report.py — the tables and plots of docs/experiments.md, from tools/experiments.sh's runs.

Reads, for each run under OUT_DIR (default runs/exp): NAME/metrics.jsonl (one train_step event per
step: loss, aux, z, per-block expert load, router logit magnitude; one eval event per 100 steps:
validation loss), analyze_NAME.json (`moelab analyze --json` of the final checkpoint). Prints the tables as Markdown
and writes the plots to docs/img/exp_*.svg (tools/svgplot.py). Standard library only.

Definitions (docs/experiments.md repeats them):
  max load share   of a block at a step: max_e load_e / sum_e load_e over the step's token-expert
                   pairs (1/E when even; 1/k when every token picks the same k experts); of the
                   model: the largest over its MoE blocks; averaged over windows of 50 steps.
  logit rms / max  sqrt(mean z^2) and max |z| over the step's router logits, every block.
"""

import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import svgplot  # noqa: E402

WINDOW = 50


def load_run(out, name):
    steps, evals = [], []
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        for line in f:
            event = json.loads(line)
            if event["name"] == "train_step":
                steps.append(event)
            elif event["name"] == "eval":
                evals.append(event)
    analysis = None
    path = os.path.join(out, f"analyze_{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            analysis = json.load(f)
    return {"name": name, "steps": steps, "evals": evals, "analysis": analysis}


def val_curve(run):
    return [e["step"] for e in run["evals"]], [e["stats"]["loss"] for e in run["evals"]]


def val_at(run, step):
    for e in run["evals"]:
        if e["step"] == step:
            return e["stats"]["loss"]
    return float("nan")


def max_load_share(event):
    """The largest share of the step's pairs that one expert took, over the MoE blocks."""
    blocks, experts = event["shape"]
    values = event["values"]
    best = 0.0
    for b in range(blocks):
        load = values[b * experts:(b + 1) * experts]
        if sum(load) > 0:
            best = max(best, max(load) / sum(load))
    return best


def windows(run, value):
    """(first step of the window, mean of value over the window) for windows of WINDOW steps."""
    out, steps = [], run["steps"]
    for start in range(0, len(steps), WINDOW):
        part = steps[start:start + WINDOW]
        out.append((part[0]["step"], statistics.fmean(value(s) for s in part)))
    return out


def window_at(series, step):
    for first, v in series:
        if first <= step < first + WINDOW:
            return v
    return float("nan")


def fmt(v, digits=3):
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def experiment_moe_vs_dense(runs, img):
    names = [n for n in ("moe_s0", "moe_s1", "dense_s0", "dense_s1") if n in runs]
    print("## 1. MoE vs dense at equal active parameters\n")
    print("Validation loss (nats/byte) after N steps of 16 x 128 bytes:\n")
    print("| run | " + " | ".join(f"{s} steps" for s in (100, 200, 500, 1000, 1500, 2000)) + " |")
    print("|---|" + "---|" * 6)
    for n in names:
        r = runs[n]
        row = [n] + [fmt(val_at(r, s), 4) for s in (100, 200, 500, 1000, 1500, 2000)]
        print("| " + " | ".join(row) + " |")
    moe = [val_at(runs[n], 2000) for n in names if n.startswith("moe")]
    dense = [val_at(runs[n], 2000) for n in names if n.startswith("dense")]
    if moe and dense:
        print(f"\nFinal validation loss, mean over seeds: MoE {fmt(statistics.fmean(moe), 4)}, dense "
              f"{fmt(statistics.fmean(dense), 4)} nats/byte (MoE - dense = "
              f"{fmt(statistics.fmean(moe) - statistics.fmean(dense), 4)}); seed-to-seed spread: MoE "
              f"{fmt(max(moe) - min(moe), 4)}, dense {fmt(max(dense) - min(dense), 4)}.\n")
    svgplot.line_chart(os.path.join(img, "exp_moe_vs_dense.svg"), "Validation loss: MoE vs dense (equal active parameters)",
                       "step", "nats / byte", [(n, *val_curve(runs[n])) for n in names])


def experiment_collapse(runs, img):
    names = [n for n in ("none", "moe_s0", "aux_free") if n in runs]
    label = {"none": "none", "moe_s0": "aux (0.02)", "aux_free": "aux_free"}
    print("## 2. Routing collapse\n")
    print(f"Max load share (largest over the MoE blocks, mean over {WINDOW}-step windows; even = 1/8 = 0.125, "
          "all pairs on the same 2 experts = 0.5), and the final validation loss:\n")
    marks = (0, 100, 500, 1000, 1950)
    print("| balance | " + " | ".join(f"steps {m}-{m + WINDOW - 1}" for m in marks) +
          " | dead experts (final) | val @ 2000 |")
    print("|---|" + "---|" * len(marks) + "---|---|")
    curves = []
    for n in names:
        r = runs[n]
        share = windows(r, max_load_share)
        curves.append((label[n], [s for s, _ in share], [v for _, v in share]))
        dead = "?"
        if r["analysis"]:
            dead = ", ".join(str(len(layer["load"]["dead"])) for layer in r["analysis"]["layers"])
        print(f"| {label[n]} | " + " | ".join(fmt(window_at(share, m)) for m in marks) +
              f" | {dead} (per block) | {fmt(val_at(r, 2000), 4)} |")
    print()
    if names and runs[names[0]]["analysis"]:
        print("Per block at the end (`moelab analyze`, validation tokens): max/mean load, and the share of the busiest expert:\n")
        print("| balance | " + " | ".join(f"block {layer['layer']}" for layer in runs[names[0]]["analysis"]["layers"]) + " |")
        print("|---|" + "---|" * len(runs[names[0]]["analysis"]["layers"]))
        for n in names:
            a = runs[n]["analysis"]
            if a:
                cells = [f"{fmt(layer['load']['max_over_mean'], 2)} ({fmt(max(layer['load']['fraction']), 3)})"
                         for layer in a["layers"]]
                print(f"| {label[n]} | " + " | ".join(cells) + " |")
        print()
    svgplot.line_chart(os.path.join(img, "exp_collapse.svg"), "Max load share over training",
                       "step", "max load share", curves)


def experiment_zloss(runs, img):
    names = [n for n in ("moe_s0", "zloss", "none", "aux_free") if n in runs]
    label = {"moe_s0": "aux, z 0", "zloss": "aux, z 1e-3", "none": "none, z 0", "aux_free": "aux_free, z 0"}
    print("## 3. Router z-loss\n")
    marks = (0, 500, 1000, 1950)
    print(f"Router logits over the step ({WINDOW}-step means): rms / max |z|; and the final validation loss:\n")
    print("| run | " + " | ".join(f"steps {m}-{m + WINDOW - 1}" for m in marks) + " | val @ 2000 |")
    print("|---|" + "---|" * len(marks) + "---|")
    rms_curves = []
    for n in names:
        r = runs[n]
        if "logit_rms" not in r["steps"][0]["stats"]:
            continue
        rms = windows(r, lambda s: s["stats"]["logit_rms"])
        mx = windows(r, lambda s: s["stats"]["logit_max_abs"])
        rms_curves.append((label[n], [s for s, _ in rms], [v for _, v in rms]))
        print(f"| {label[n]} | " + " | ".join(f"{fmt(window_at(rms, m), 2)} / {fmt(window_at(mx, m), 1)}" for m in marks) +
              f" | {fmt(val_at(r, 2000), 4)} |")
    print()
    if rms_curves:
        svgplot.line_chart(os.path.join(img, "exp_zloss.svg"), "Router logit rms over training",
                           "step", "rms of router logits", rms_curves)


def experiment_specialisation(runs):
    names = [n for n in ("moe_s0", "aux_free", "none", "zloss") if n in runs and runs[n]["analysis"]]
    print("## 4. Specialisation per layer\n")
    print("Normalised mutual information of the chosen experts with the domain and with the byte class "
          "(I / H(label)), the domain MI's permutation baseline (mean of 20 shuffles of the domain labels), "
          "and vocabulary specialisation (mean over bytes seen >= 20 times of the share of a byte's "
          "assignments that go to its most frequent expert):\n")
    print("| run | block | domain MI (norm.) | shuffled baseline | byte-class MI (norm.) | vocabulary specialisation |")
    print("|---|---|---|---|---|---|")
    for n in names:
        for layer in runs[n]["analysis"]["layers"]:
            base = layer.get("domain_mi_baseline") or {}
            dmi = layer["domain_mi"]
            base_norm = base.get("mean", float("nan")) / dmi["label_entropy"] if dmi["label_entropy"] else float("nan")
            print(f"| {n} | {layer['layer']} | {fmt(dmi['normalised'])} | {fmt(base_norm)} | "
                  f"{fmt(layer['byte_class_mi']['normalised'])} | {fmt(layer['vocabulary']['mean'])} |")
    print()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/exp"
    img = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img")
    names = ["moe_s0", "moe_s1", "dense_s0", "dense_s1", "none", "aux_free", "zloss"]
    # A run is reported once finished: `moelab train --json` writes NAME.json at the end.
    runs = {n: load_run(out, n) for n in names
            if os.path.exists(os.path.join(out, n, "metrics.jsonl")) and os.path.getsize(os.path.join(out, n + ".json")) > 0}
    if not runs:
        sys.exit(f"experiments_report: no runs under {out} (tools/experiments.sh makes them)")
    experiment_moe_vs_dense(runs, img)
    experiment_collapse(runs, img)
    experiment_zloss(runs, img)
    experiment_specialisation(runs)


if __name__ == "__main__":
    main()
