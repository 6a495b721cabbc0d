"""results.json → results.md (tables), PNG plots, and the change against an earlier run."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _opt(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    env, rows = results["environment"], results["rows"]
    out = [f"# prism-rt bench — preset {results['preset']['name']} ({results['mode']})", "",
           f"{results['created_utc']}; {env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('threads')} threads)"
           + (f"; GPU {env['gpu']} (driver {env.get('gpu_driver', '?')}, CUDA {env.get('cuda')})" if env.get("gpu") else "")
           + f"; onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}; wall {results['wall_s']} s.", "",
           f"Steps {results['preset']['steps']}, self-window sweep {results['preset']['sweep']} "
           f"(edit batch 2·(1+K·S) = {results['edit_batch']}). Times: median over {results['preset']['repeats']} repeats "
           "after warm-up (p10–p90 in brackets).", ""]
    cf = [r for r in rows if r["kind"] == "counterfactual"]
    if cf:
        out += ["## Per counterfactual, end to end", "",
                "| configuration | s / counterfactual | speed-up vs reference | invert s | edit s | UNet items | "
                "peak RSS MB | PSNR vs ref (min) | SSIM vs ref (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cf:
            q = r.get("quality_vs_reference") or {}
            st = r["stages_s_per_counterfactual"]
            out.append(f"| {r['config']} | {r['seconds_per_counterfactual']:.2f} | "
                       f"{_opt(r.get('speedup_vs_reference'), '{:.2f}×')} | {st['invert_s']:.2f} | {st['edit_s']:.2f} | "
                       f"{r['unet_items_per_counterfactual']:.0f} | {_opt(r['peak_rss_mb'], '{:.0f}')} | "
                       f"{_opt(q.get('psnr_db_min'), '{:.1f} dB')} | {_opt(q.get('ssim_min'), '{:.3f}')} |")
        out.append("")
    judged = [r for r in cf if r.get("edit_judgement")]
    if judged:
        j0 = judged[0]["edit_judgement"]
        out += [f"## Edit judged against the true counterfactual ({j0['direction']} {j0['attribute']})", "",
                "| configuration | success | CPG | PSNR outside mask dB | truth L1 inside | truth L1 outside |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in judged:
            j = r["edit_judgement"]
            out.append(f"| {r['config']} | {'yes' if j['success'] else 'no'} | {j['cpg']:.3f} | "
                       f"{_opt(j['identity_outside_mask']['psnr_db'])} | {_opt((j.get('truth') or {}).get('l1_inside'), '{:.4f}')} | "
                       f"{_opt((j.get('truth') or {}).get('l1_outside'), '{:.4f}')} |")
        out.append("")
    dec = [r for r in rows if r["kind"] == "decomposition"]
    if dec:
        out += ["## Where the speed-up comes from", "", "| part | change | speed-up |", "|---|---|---:|"]
        out += [f"| {r['part']} | {r['what']} | {r['speedup']:.2f}× |" for r in dec]
        out.append("")
    tp = [r for r in rows if r["kind"] == "throughput"]
    if tp:
        out += ["## Throughput", "", "| configuration | images G | counterfactuals / minute | one image at a time | "
                "batching |", "|---|---:|---:|---:|---|"]
        out += [f"| {r['config']} | {r['images']} | {r['counterfactuals_per_minute']:.1f} | "
                f"{r['one_image_counterfactuals_per_minute']:.1f} | {r['batching']} |" for r in tp]
        out.append("")
    graphs = [r for r in rows if r["kind"] == "graph"]
    if graphs:
        configs = list(dict.fromkeys((r["backend"], r["precision"]) for r in graphs))
        batches = sorted({r["batch"] for r in graphs})
        for graph in dict.fromkeys(r["graph"] for r in graphs):
            out += [f"## {graph}", "", "| backend | precision | " + " | ".join(f"batch {b}" for b in batches)
                    + f" | vs torch fp32 at batch {batches[-1]} | peak RSS MB |",
                    "|---|---|" + "---:|" * (len(batches) + 2)]
            for backend, precision in configs:
                cells, last, rss = [], None, None
                for b in batches:
                    r = next((x for x in graphs if x["graph"] == graph and x["backend"] == backend
                              and x["precision"] == precision and x["batch"] == b), None)
                    cells.append("–" if r is None else f"{_fmt_s(r['median_s'])} ({_fmt_s(r['p10_s'])}–{_fmt_s(r['p90_s'])})")
                    last, rss = (r, r.get("peak_rss_mb")) if r is not None else (last, rss)
                if all(c == "–" for c in cells):
                    continue
                out.append(f"| {backend} | {precision} | " + " | ".join(cells) + f" | "
                           f"{_opt(last.get('speedup_vs_torch_fp32') if last else None, '{:.2f}×')} | {_opt(rss, '{:.0f}')} |")
            out.append("")
    shared = [r for r in rows if r.get("peak_rss_note") and r["kind"] != "graph_paired"]
    if shared:
        peaks = [r["process_peak_rss_mb"] for r in shared if r.get("process_peak_rss_mb") is not None]
        out += [f"Peak RSS: –, {shared[0]['peak_rss_note']}"
                + (f" ({min(peaks):.0f}–{max(peaks):.0f} MB)." if peaks else "."), ""]
    paired = [r for r in rows if r["kind"] == "graph_paired"]
    if paired:
        own = paired[0].get("process", "shared") == "own"
        out += ["## Paired: torch fp32 and each precision in turn, "
                + ("each in its own process" if own else "all in one process"), "",
                "Each round calls every configuration once on the same inputs (order rotated); the ratio is "
                "torch fp32's time over the configuration's in the same round, median (p10–p90) over "
                f"{paired[0]['repeats']} rounds. "
                + ("Peak RSS is each configuration's own process's." if own else
                   "A configuration's own peak RSS is not measurable there; the process's, all of them "
                   f"together: {_opt(paired[0].get('process_peak_rss_mb'), '{:.0f}')} MB."), "",
                "| graph | batch | backend | precision | median | ratio to torch fp32 | rms rel. diff. of output "
                "| page faults / call | kernel time / call | peak RSS MB |",
                "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in paired:
            q = r["ratio_to_torch_fp32"]
            out.append(f"| {r['graph']} | {r['batch']} | {r['backend']} | {r['precision']} | "
                       f"{_fmt_s(r['median_s'])} ({_fmt_s(r['p10_s'])}–{_fmt_s(r['p90_s'])}) | "
                       f"{q['median']:.2f}× ({q['p10']:.2f}–{q['p90']:.2f}) | {r['rms_rel_diff_vs_torch_fp32']:.2e} | "
                       f"{_opt(r.get('minor_faults_per_call'), '{:,}')} | {_opt(r.get('system_s_per_call'), '{:.2f} s')} | "
                       f"{_opt(r.get('peak_rss_mb'), '{:.0f}')} |")
        out.append("")
    return "\n".join(out)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["rows"]
    cf = [r for r in rows if r["kind"] == "counterfactual"]
    if cf:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.6 * len(cf) + 2), sharey=True)
        names = [r["config"] for r in cf]
        inv = [r["stages_s_per_counterfactual"]["invert_s"] for r in cf]
        edit = [r["stages_s_per_counterfactual"]["edit_s"] for r in cf]
        y = range(len(cf))
        ax1.barh(y, inv, label="inversion", color="#4c72b0")
        ax1.barh(y, edit, left=inv, label="editing (+ decode)", color="#dd8452")
        ax1.set_yticks(list(y), names, fontsize=8)
        ax1.invert_yaxis()
        ax1.set_xlabel("seconds per counterfactual")
        ax1.legend(loc="lower right")
        ax1.set_title("latency per stage")
        speed = [r.get("speedup_vs_reference") or 0 for r in cf]
        ax2.barh(y, speed, color=["#8c8c8c" if r["role"] == "reference" else "#55a868" for r in cf])
        ax2.axvline(1.0, color="k", lw=0.8)
        for i, v in enumerate(speed):
            ax2.text(v, i, f" {v:.1f}×", va="center", fontsize=8)
        ax2.set_xlabel("speed-up over the PRISM reference (same run)")
        ax2.set_title("speed-up")
        fig.tight_layout()
        path = out / "counterfactual_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    graphs = [r for r in rows if r["kind"] == "graph"]
    if graphs:
        names = list(dict.fromkeys(r["graph"] for r in graphs))
        configs = list(dict.fromkeys((r["backend"], r["precision"]) for r in graphs))
        batch = results["edit_batch"] if any(r["batch"] == results["edit_batch"] for r in graphs) else max(r["batch"] for r in graphs)
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 0.45 * len(configs) + 2))
        for ax, graph in zip(axes if len(names) > 1 else [axes], names):
            vals, labels = [], []
            for backend, precision in configs:
                r = next((x for x in graphs if x["graph"] == graph and x["backend"] == backend
                          and x["precision"] == precision and x["batch"] == batch), None)
                if r is not None:
                    vals.append(r["median_s"] * 1000)
                    labels.append(f"{backend} {precision}")
            ax.barh(range(len(vals)), vals, color="#4c72b0")
            ax.set_yticks(range(len(vals)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{graph}, batch {batch}")
            ax.set_xlabel("ms (median)")
        fig.tight_layout()
        path = out / "graph_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _key(row: dict) -> tuple | None:
    if row["kind"] in ("graph", "graph_paired"):
        return (row["kind"], row["backend"], row["precision"], row["graph"], row["batch"])
    if row["kind"] in ("counterfactual", "throughput"):
        return (row["kind"], row["config"])
    return None


def _value(row: dict) -> float | None:
    return row.get("median_s") or row.get("seconds_per_counterfactual")


def compare(new: dict, old_path: Path) -> str:
    """Median (or s / counterfactual) of each row present in both runs: old, new, change."""
    old = json.loads(Path(old_path).read_text())
    before = {_key(r): r for r in old.get("rows", []) if _key(r)}
    lines = [f"change against {old_path} ({old.get('created_utc')}, preset {old.get('preset', {}).get('name')}):",
             f"{'measurement':70s} {'old':>10s} {'new':>10s} {'change':>8s}"]
    for row in new["rows"]:
        key = _key(row)
        if key in before and _value(before[key]) and _value(row):
            a, b = _value(before[key]), _value(row)
            label = (" ".join(str(k) for k in key[1:]) + (" (paired)" if key[0] == "graph_paired" else ""))[:70]
            lines.append(f"{label:70s} {_fmt_s(a):>10s} {_fmt_s(b):>10s} {100 * (b - a) / a:+7.1f}%")
    if len(lines) == 2:
        lines.append("(no measurement in common)")
    return "\n".join(lines)
