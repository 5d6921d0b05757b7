"""What `effgen parity` writes for a reader: differences.png (C - TF per class and
target) and the summary lines."""

import numpy as np

from effgen import schema


def plot_differences(results, tf_probs, path):
    """Histograms of C - TF per class, one panel per target (per-row calls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effgen.atomic import atomic_path

    names = list(results)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        c = results[name]["per_row"].astype(np.float64)
        d = c - tf_probs[: len(c)]
        lim = max(float(np.nanmax(np.abs(d))), 1e-9)
        bins = np.linspace(-lim, lim, 81)
        for k, cls in enumerate(schema.OUTPUTS):
            ax.hist(d[:, k], bins=bins, histtype="step", label=cls, log=True)
        ax.set_title(f"{name}: C - TF ({len(c)} rows)")
        ax.set_xlabel("probability difference")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def summary(report) -> str:
    lines = [f"effgen parity: {'PASSED' if report['passed'] else 'FAILED'}  "
             f"({report['rows']} rows, backend {report.get('backend')}, {report['runtime_s']:.1f} s)"]
    for name, t in report["targets"].items():
        if "values" not in t:
            lines.append(f"  {name:<11} CRASHED or did not build (see report.json)")
            continue
        v, d = t["values"], t["draws_identical_uniforms"]
        net = v.get("network", {}).get("max")
        lines.append(
            f"  {name:<11} max|C-TF| row {v['per_row']['max']:.2e} batch {v['batch']['max']:.2e}"
            + (f" network {net:.2e}" if net is not None else "")
            + f" (tol {t['tolerances']['function']:g}); draws {d['disagreements']} differ"
            f" ({d['rounding']} rounding, {d['unexplained']} not); {t['rows']} rows"
            f" {'ok' if t['passed'] else 'FAIL'}")
    dist = report.get("draw_distribution")
    if dist:
        pv = [f"{b['bin']}: {b['p_value']:.3g}" for b in dist["per_bin"] if b["p_value"] is not None]
        lines.append(f"  draws ({dist['target']}, {dist['n_draws']}): overall p = "
                     f"{dist['overall']['p_value']:.3g}; per bin " + ", ".join(pv))
    for f in report["failures"][:12]:
        lines.append(f"  FAIL {f[:300]}")
    return "\n".join(lines)
