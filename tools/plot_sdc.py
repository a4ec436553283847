"""Charts and tables of `moelab sdc --json` studies (docs/sdc.md), with no dependency but Python 3.

    python3 tools/plot_sdc.py --out docs/img trained=runs/sdc-tiny/study.json random=runs/sdc-random/study.json

Writes, per study NAME: sdc_logit_error_NAME.svg (mean relative logit error per site and format, one
panel per bit class, log scale) and sdc_nonfinite_NAME.svg (share of trials that ended in NaN/inf);
for all studies together sdc_ratio.svg (router / expert damage per format and bit class, transient
and weight faults, with the claimed 10,000x drawn in). Prints the Markdown tables of docs/sdc.md.
"""
import argparse
import json
import math
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from svgplot import write_atomically  # noqa: E402

SITES = ["router_input", "router_weights", "router_logits", "gate_values",
         "expert_weights", "expert_activations", "expert_outputs", "combine_output"]
COLOURS = {"fp32": "#4e79a7", "bf16": "#f28e2b", "fp8_e4m3": "#59a14f", "fp16": "#e15759", "fp8_e5m2": "#b07aa1"}
FONT = 'font-family="sans-serif" font-size="11"'


def number(v):
    """A JSON number of moelab (non-finite ones are strings) as a float."""
    return float(v)  # float() reads moelab's "nan", "inf" and "-inf" as well


def cells_by(study):
    return {(c["site"], c["dtype"], c["bits"]): c for c in study["cells"]}


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def text(x, y, s, anchor="middle", extra=""):
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT} {extra}>{s}</text>'


def log_panel(x0, y0, w, h, groups, series, values, lo, hi, title, ylabel, marks=()):
    """Bars on a log axis: values[(group, series)] (None or <= 0: no bar), decades lo..hi."""
    body = [text(x0 + w / 2, y0 - 8, title, extra='font-weight="bold"')]
    def y_of(v):
        return y0 + h - (math.log10(v) - lo) / (hi - lo) * h
    for d in range(lo, hi + 1):
        y = y_of(10.0 ** d)
        body.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(text(x0 - 4, y + 4, f"1e{d}", anchor="end"))
    for value, label in marks:
        y = y_of(value)
        body.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#c00" stroke-dasharray="5,3"/>')
        body.append(text(x0 + w - 2, y - 3, label, anchor="end", extra='fill="#c00"'))
    gw = w / len(groups)
    bw = gw * 0.8 / len(series)
    for i, g in enumerate(groups):
        for j, s in enumerate(series):
            v = values.get((g, s))
            if v is None or not (v > 0) or math.isinf(v):
                continue
            v = min(max(v, 10.0 ** lo), 10.0 ** hi)
            x = x0 + i * gw + gw * 0.1 + j * bw
            y = y_of(v)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{y0 + h - y:.1f}" '
                        f'fill="{COLOURS.get(s, "#888")}"><title>{g} {s}: {v:.3g}</title></rect>')
        body.append(text(x0 + (i + 0.5) * gw, y0 + h + 14, g.replace("_", " ")))
    body.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>')
    body.append(text(x0 - 42, y0 + h / 2, ylabel, extra=f'transform="rotate(-90 {x0 - 42} {y0 + h / 2})"'))
    return body


def legend(x, y, series):
    body = []
    for j, s in enumerate(series):
        body.append(f'<rect x="{x + j * 90}" y="{y - 9}" width="10" height="10" fill="{COLOURS.get(s, "#888")}"/>')
        body.append(text(x + j * 90 + 14, y, s, anchor="start"))
    return body


def decades(values):
    finite = [v for v in values if v and v > 0 and not math.isinf(v)]
    if not finite:
        return -6, 0
    return math.floor(math.log10(min(finite))), math.ceil(math.log10(max(finite)))


def logit_error_chart(name, study):
    cells = cells_by(study)
    dtypes = list(dict.fromkeys(c["dtype"] for c in study["cells"]))
    bits = list(dict.fromkeys(c["bits"] for c in study["cells"]))
    values = {(s, d, b): number(cells[(s, d, b)]["summary"]["logit_rel_error"]["mean"])
              for (s, d, b) in cells}
    lo, hi = decades(values.values())
    w, h, top = 760, 150, 40
    body = [text(400, 18, f"{name}: mean relative error of the final logits per trial (finite trials), "
                 f"{study['trials']} trials per bar", extra='font-weight="bold"')]
    body += legend(560, 34, dtypes)
    for k, b in enumerate(bits):
        y0 = top + 30 + k * (h + 50)
        panel = {(s, d): values[(s, d, b)] for (s, d, bb) in values if bb == b}
        body += log_panel(70, y0, w, h, SITES, dtypes, panel, lo, hi, f"bits: {b}", "logit error")
    return svg(860, top + 30 + len(bits) * (h + 50), body)


def nonfinite_chart(name, study):
    cells = cells_by(study)
    dtypes = list(dict.fromkeys(c["dtype"] for c in study["cells"]))
    bits = [b for b in dict.fromkeys(c["bits"] for c in study["cells"]) if b in ("exponent", "any")]
    w, h, top = 760, 140, 40
    body = [text(430, 18, f"{name}: share of trials that ended in NaN/inf (refused by a router, or in the logits)",
                 extra='font-weight="bold"')]
    body += legend(560, 34, dtypes)
    for k, b in enumerate(bits):
        y0 = top + 30 + k * (h + 50)
        rates = {(s, d): number(cells[(s, d, b)]["summary"]["nonfinite_rate"]) for (s, d, bb) in cells if bb == b}
        top_rate = max([r for r in rates.values()] + [0.01])
        scale = 10 ** math.ceil(math.log10(top_rate * 100)) / 100
        body.append(text(70 + w / 2, y0 - 8, f"bits: {b}", extra='font-weight="bold"'))
        for t in range(0, 5):
            y = y0 + h - t / 4 * h
            body.append(f'<line x1="70" y1="{y:.1f}" x2="{70 + w}" y2="{y:.1f}" stroke="#ddd"/>')
            body.append(text(66, y + 4, f"{100 * scale * t / 4:.2g}%", anchor="end"))
        gw = w / len(SITES)
        bw = gw * 0.8 / len(dtypes)
        for i, s in enumerate(SITES):
            for j, d in enumerate(dtypes):
                r = rates.get((s, d), 0)
                bh = r / scale * h
                x = 70 + i * gw + gw * 0.1 + j * bw
                body.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                            f'fill="{COLOURS.get(d, "#888")}"><title>{s} {d}: {100 * r:.2f}%</title></rect>')
            body.append(text(70 + (i + 0.5) * gw, y0 + h + 14, s.replace("_", " ")))
        body.append(f'<line x1="70" y1="{y0 + h}" x2="{70 + w}" y2="{y0 + h}" stroke="black"/>')
    return svg(860, top + 30 + len(bits) * (h + 50), body)


def ratio_chart(studies):
    body = [text(430, 18, "router damage / expert damage (mean logit error, router sites pooled / expert sites pooled)",
                 extra='font-weight="bold"')]
    panels = [(n, kind) for n in studies for kind in ("transient", "weight")]
    dtypes = list(dict.fromkeys(r["dtype"] for s in studies.values() for r in s["ratios"]))
    body += legend(560, 34, dtypes)
    w, h, top = 760, 150, 40
    all_values = [number(r["ratio"]) for s in studies.values() for r in s["ratios"]] + [1e4]
    lo, hi = decades(all_values)
    for k, (n, kind) in enumerate(panels):
        y0 = top + 30 + k * (h + 50)
        rows = [r for r in studies[n]["ratios"] if r["kind"] == kind]
        bits = list(dict.fromkeys(r["bits"] for r in rows))
        values = {(r["bits"], r["dtype"]): number(r["ratio"]) for r in rows}
        body += log_panel(70, y0, w, h, bits, dtypes, values, lo, hi, f"{n}, {kind} faults", "router / expert",
                          marks=((1.0, "1x"), (1e4, "the claim: 10,000x")))
    return svg(860, top + 30 + len(panels) * (h + 50), body)


def fmt(v, percent=False):
    v = number(v)
    if math.isnan(v):
        return "-"
    if percent:
        return "0" if v == 0 else f"{100 * v:.3g}%"
    return "0" if v == 0 else f"{v:.2g}"


def tables(studies):
    out = []
    for name, study in studies.items():
        cells = cells_by(study)
        dtypes = list(dict.fromkeys(c["dtype"] for c in study["cells"]))
        bits = list(dict.fromkeys(c["bits"] for c in study["cells"]))
        out.append(f"\n#### {name}: mean relative logit error (share of trials ending in NaN/inf)\n")
        out.append("| site | kind | " + " | ".join(f"{d} {b}" for d in dtypes for b in bits) + " |")
        out.append("| --- | --- |" + " ---: |" * (len(dtypes) * len(bits)))
        for s in SITES:
            row = []
            for d in dtypes:
                for b in bits:
                    m = cells[(s, d, b)]["summary"]
                    nf = number(m["nonfinite_rate"])
                    row.append(fmt(m["logit_rel_error"]["mean"]) + (f" ({fmt(nf, True)})" if nf > 0 else ""))
            kind = cells[(s, dtypes[0], bits[0])]["kind"]
            out.append(f"| {s} | {kind} | " + " | ".join(row) + " |")
        out.append(f"\n#### {name}: selections changed (share of token-block pairs), own selection changed, "
                   "lockstep detection; bits = any\n")
        out.append("| site | " + " | ".join(f"{d} sel / own / lockstep" for d in dtypes) + " |")
        out.append("| --- |" + " ---: |" * len(dtypes))
        for s in SITES:
            row = []
            for d in dtypes:
                m = cells[(s, d, "any")]["summary"]
                row.append(f"{fmt(m['selections_changed']['mean'], True)} / {fmt(m['own_selection_changed'], True)} / "
                           f"{fmt(m['lockstep_detected'], True)}")
            out.append(f"| {s} | " + " | ".join(row) + " |")
    out.append("\n#### router / expert damage ratio (mean logit error; NaN/inf share router / expert)\n")
    names = list(studies)
    out.append("| dtype | bits | kind | " + " | ".join(f"{n} ratio | {n} NaN/inf" for n in names) + " |")
    out.append("| --- | --- | --- |" + " ---: | ---: |" * len(names))
    first = studies[names[0]]["ratios"]
    for r in first:
        row = []
        for n in names:
            q = next(x for x in studies[n]["ratios"]
                     if (x["dtype"], x["bits"], x["kind"]) == (r["dtype"], r["bits"], r["kind"]))
            row.append(f"{fmt(q['ratio'])} | {fmt(q['router_nonfinite_rate'], True)} / "
                       f"{fmt(q['expert_nonfinite_rate'], True)}")
        out.append(f"| {r['dtype']} | {r['bits']} | {r['kind']} | " + " | ".join(row) + " |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the SVG files")
    parser.add_argument("studies", nargs="+", help="NAME=study.json")
    args = parser.parse_args()
    studies = {}
    for item in args.studies:
        name, _, path = item.partition("=")
        studies[name] = json.loads(pathlib.Path(path).read_text())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, study in studies.items():
        write_atomically(out / f"sdc_logit_error_{name}.svg", logit_error_chart(name, study))
        write_atomically(out / f"sdc_nonfinite_{name}.svg", nonfinite_chart(name, study))
    write_atomically(out / "sdc_ratio.svg", ratio_chart(studies))
    print(tables(studies))


if __name__ == "__main__":
    main()
