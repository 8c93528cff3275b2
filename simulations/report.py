"""runs/<id>/report.html: one static page (images inline, no network) for the privacy officer and the curator."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.privacy.audit import AuditReport, epsilon_series  # noqa: E402
from server.run_folder import write_atomic  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #1a1a1a; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; } td.num { text-align: right; } .ok { color: #146c2e; } .fail { color: #b00020; }
.claim { background: #f6f8fa; border-left: 4px solid #4a6fa5; padding: .6em 1em; }
figure { display: inline-block; margin: .5em; } img { max-width: 520px; }
"""

# marks the page once every image has decoded; the rendering test reads these attributes
IMAGE_CHECK = """
<script>
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
});
</script>
"""


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (6, 4), integer_x: bool = True) -> str:
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    if integer_x and ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(title: str, png: str) -> str:
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{"n/a" if math.isnan(value) else f"{value:.4g}"}</td>'
        if isinstance(value, int):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(run_dir: Path, audit: AuditReport, sweep_file: Path | None = None) -> Path:
    config = json.loads((run_dir / "config.json").read_text())
    status = _read(run_dir / "status.json") or {}
    rounds = (_read(run_dir / "metrics.json") or {}).get("rounds", [])
    mia, canaries = _read(run_dir / "audit" / "mia.json"), _read(run_dir / "audit" / "canaries.json")
    whitebox = _read(run_dir / "audit" / "whitebox.json")
    sweep = _read(sweep_file) if sweep_file else None
    parts = [f"<h1>CareFed privacy and utility report: {html.escape(run_dir.name)}</h1>", _summary(config, status)]
    parts.append(_claim(config))
    parts.append(_verdict(audit))
    parts.append("<h2>Utility</h2>" + _utility(rounds))
    parts.append("<h2>Privacy spent per round and site</h2>" + _epsilon(audit, config))
    parts.append("<h2>Membership inference on the final model</h2>" + _mia(mia))
    parts.append("<h2>White-box canaries at every site</h2>" + _whitebox(whitebox))
    parts.append("<h2>One-run canary audit (black box)</h2>" + _canaries(canaries))
    parts.append("<h2>Privacy-utility trade-off</h2>" + _sweep(sweep))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>CareFed report {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}{IMAGE_CHECK}</body></html>")
    out = run_dir / "report.html"
    write_atomic(out, page.encode())
    return out


def _summary(config: dict[str, Any], status: dict[str, Any]) -> str:
    rows = [["sites", config["num-sites"]], ["rounds run", status.get("rounds", "?")],
            ["status", status.get("state", "?")], ["data", config["data"]], ["model", config["model"]],
            ["DP-SGD", "on" if config["dp"] else "OFF (not private)"],
            ["target (epsilon, delta) per site", f"({config['target-epsilon']}, {config['target-delta']})"],
            ["privacy unit", config["privacy-unit"]],
            ["secure aggregation", "on" if config["secagg"] else "off"]]
    return _table(["setting", "value"], rows)


def _claim(config: dict[str, Any]) -> str:
    if not config["dp"]:
        return '<p class="claim fail">This run was trained <b>without</b> differential privacy: no privacy claim.</p>'
    unit = "patient" if config["privacy-unit"] == "patient" else "training image"
    return (f'<p class="claim">Each site\'s released updates over the whole run are ({config["target-epsilon"]}, '
            f'{config["target-delta"]})-differentially private with respect to one {unit} of that site '
            "(add/remove adjacency), by Opacus's PRV accountant composed over every DP-SGD step, checked with "
            "dp-accounting's PLD accountant, at most each site's own policy allows (per study and over the "
            "dataset's lifetime). It holds whatever the coordinator sends: every parameter is checked against the "
            "site's policy before use. <b>Treated as public</b>: each site's size (its sampling rate and noise are "
            "calibrated from it), the sampling rate, noise multiplier, clip norm and steps, the largest number of "
            "images per patient, and, where a site's policy allows, its local test size, loss and accuracy. Secure "
            "aggregation additionally hides individual updates from the coordinator.</p>")


def _verdict(audit: AuditReport) -> str:
    ledgers = _table(["ledger", "source", "entries", "chain"],
                     [[ledger["path"], ledger["source"], ledger["entries"],
                       "intact" if ledger["chain_ok"] else "BROKEN"] for ledger in audit.ledgers])
    if audit.ok:
        verdict = ('<p class="ok"><b>Audit passed</b>: every ledger chain is intact, every epsilon was recomputed '
                   "independently within 1%, no site exceeded its budget.</p>")
    else:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in audit.problems)
        verdict = f'<p class="fail"><b>Audit failed</b>:</p><ul class="fail">{items}</ul>'
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in audit.notes)
    return "<h2>Ledger verification</h2>" + verdict + ledgers + (f"<ul>{notes}</ul>" if notes else "")


def _utility(rounds: list[dict[str, Any]]) -> str:
    if not rounds:
        return "<p>No rounds recorded.</p>"

    def accuracy(ax: Any) -> None:
        xs = [r["round"] for r in rounds]
        ax.plot(xs, [r["global-accuracy"] for r in rounds], marker="o", label="global test set")
        for key, label in (("mean-site-accuracy", "mean over sites"), ("worst-site-accuracy", "worst site")):
            ax.plot(xs, [r.get(key) or math.nan for r in rounds], marker=".", label=label)
        ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Accuracy per round")
        ax.legend()
        ax.grid(alpha=0.3)

    last = rounds[-1]
    sites = {int(k): v for k, v in last.get("site-accuracy", {}).items()}

    def fairness(ax: Any) -> None:
        ax.bar([str(s) for s in sites], list(sites.values()), color="#4a6fa5")
        ax.axhline(last["global-accuracy"], color="black", linestyle="--", label="global test set")
        ax.set(xlabel="site", ylabel="local test accuracy", ylim=(0, 1),
               title=f"Per-site accuracy, round {last['round']}")
        ax.legend()

    figures = _figure("Accuracy per round", _png(accuracy))
    text = ""
    if sites:
        figures += _figure("Per-site accuracy (fairness)", _png(fairness))
        worst, best = min(sites.values()), max(sites.values())
        text = (f"<p>Final round: global accuracy {last['global-accuracy']:.3f}; worst site {worst:.3f} "
                f"(site {min(sites, key=sites.get)}), best site {best:.3f}: a gap of {best - worst:.3f}.</p>")
    return figures + text


def _epsilon(audit: AuditReport, config: dict[str, Any]) -> str:
    series = epsilon_series(audit)
    if not series:
        return "<p>No privacy ledger entries (DP was off, or no round completed).</p>"

    def draw(ax: Any) -> None:
        for site, points in sorted(series.items()):
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"site {site} image")
            patient = [(p[0], p[2]) for p in points if p[2] is not None]
            if patient and config["privacy-unit"] == "image":
                ax.plot([p[0] for p in patient], [p[1] for p in patient], linestyle="--", color=line.get_color())
        ax.axhline(config["target-epsilon"], color="red", linestyle=":", label="budget")
        ax.set(xlabel="round", ylabel="epsilon (whole run so far)", title="Epsilon per site: image (solid), "
               "patient (dashed)")
        ax.set_yscale("log")
        if len(series) <= 10:
            ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)

    rows = [[r.round, r.site, r.unit, r.epsilon_logged, r.epsilon_recomputed,
             math.nan if r.epsilon_patient is None else r.epsilon_patient, r.images_per_patient, r.budget,
             ",".join(r.flags) or "ok"] for r in audit.rows if r.source == ("run" if any(
                 x.source == "run" for x in audit.rows) else "site")]
    return (_figure("Epsilon per round per site", _png(draw, (7, 4.5)))
            + "<p>Patient-level epsilon is that of the same image-level training for the site's largest patient "
              "(k images), from dp-accounting's mixture-of-Gaussians PLD: record-level DP protects a patient with "
              "several images much less.</p><details><summary>All rows</summary>"
            + _table(["round", "site", "unit", "eps PRV (logged)", "eps PLD (recomputed)", "eps patient",
                      "k images", "budget", "flags"], rows) + "</details>")


def _mia(mia: dict[str, Any] | None) -> str:
    if not mia:
        return "<p>Not run. <code>carefed audit RUN_DIR --attack mia</code> adds it.</p>"
    pooled = mia["pooled"]

    def draw(ax: Any) -> None:
        for attack, label in (("loss", "loss threshold"), ("lira", f"offline LiRA ({mia['shadow_models']} shadows)")):
            ax.plot(pooled[attack]["fpr"], pooled[attack]["tpr"], label=f"{label}, AUC {pooled[attack]['auc']:.3f}")
        ax.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle=":", label="chance")
        ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
               ylabel="true positive rate", title="Membership inference ROC (all sites pooled)")
        ax.legend(fontsize="small")

    rows = [["all sites", attack, v["auc"], v["tpr_at_1pct_fpr"], v["tpr_at_01pct_fpr"], v["members"],
             v["non_members"]] for attack, v in pooled.items()]
    for site, attacks in sorted(mia["per_site"].items(), key=lambda kv: int(kv[0])):
        rows += [[f"site {site}", attack, v["auc"], v["tpr_at_1pct_fpr"], v["tpr_at_01pct_fpr"], v["members"],
                  v["non_members"]] for attack, v in attacks.items()]
    return (_figure("Membership inference ROC", _png(draw))
            + "<p>Members: each site's training images; non-members: its held-out test images. With few "
              "non-members a site cannot resolve FPRs below 1/(non-members): TPR at such an FPR is TPR at FPR 0."
              "</p>" + _table(["scope", "attack", "ROC AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "members",
                               "non-members"], rows))


def _canaries(canaries: dict[str, Any] | None) -> str:
    if not canaries:
        return "<p>Not run. <code>carefed audit RUN_DIR --canaries 500</code> adds it (it retrains the study).</p>"
    rows = [[name, "on" if arm["dp"] else "off", arm["included"], arm["guesses"], arm["correct"],
             arm["epsilon_lower_bound"], arm.get("ceiling", math.nan), arm["theoretical_epsilon"] if arm["dp"]
             else "none", "yes" if arm["consistent"] else "NO"] for name, arm in canaries["arms"].items()]
    return (f"<p>{canaries['canaries']} canaries (held-out images with a wrong label), each in training with "
            f"probability 1/2; scored by the relative drop of their loss against the same training without "
            f"canaries; guesses on the "
            f"top and bottom {canaries['guess_fraction']:.0%} of scores; lower bound at 95% confidence "
            "(Steinke, Nasr and Jagielski 2023). The ceiling is the most this audit can certify with this many "
            "canaries (every guess right): where it is below the theoretical epsilon, this audit cannot fail, and a "
            "bound below theory is no evidence that the implementation is right.</p>"
            + _table(["run", "DP", "canaries included", "guesses", "correct", "epsilon lower bound", "ceiling",
                      "theoretical epsilon", "bound <= theory"], rows))


def _whitebox(whitebox: dict[str, Any] | None) -> str:
    if not whitebox:
        return ("<p>Not run. <code>carefed audit RUN_DIR --whitebox 4000</code> adds it (each site trains its own "
                "model with the run's settings; minutes).</p>")
    sites = sorted(whitebox["sites"].items(), key=lambda kv: int(kv[0]))

    def draw(ax: Any) -> None:
        xs = np.arange(len(sites))
        ax.bar(xs - 0.2, [r["claimed_epsilon"] for _, r in sites], 0.4, label="accountant (PRV)")
        ax.bar(xs + 0.2, [r["epsilon_lower_bound"] for _, r in sites], 0.4, label="canaries' lower bound (95%)")
        top = 1.3 * max(max(r["claimed_epsilon"], r["epsilon_lower_bound"]) for _, r in sites)
        ceiling = max(r["ceiling"] for _, r in sites)
        if ceiling <= top:  # a ceiling far above the accountant would only squash the bars
            ax.axhline(ceiling, color="grey", linestyle=":", label="most the canaries can show")
        ax.set_ylim(0, max(top, 1e-3))
        ax.set(xticks=xs, xticklabels=[f"site {k}" for k, _ in sites], ylabel="epsilon",
               title=f"White-box canaries at epsilon {whitebox['audit_epsilon']:g}")
        ax.legend(fontsize="small")

    rows = [[f"site {k}", r["claimed_epsilon"], r["epsilon_lower_bound"], r["bound_over_claimed"],
             r.get("one_run_epsilon", math.nan), r["ceiling"],
             f"{r.get('true_positive_lower', math.nan):.3f} / {r.get('false_positive_upper', math.nan):.4f}",
             r["score"], "yes" if r["consistent"] else "NO"] for k, r in sites]
    return (_figure("White-box canaries: lower bound against the accountant", _png(draw, integer_x=False))
            + f"<p>{whitebox['canaries']} Dirac gradient canaries per site, each in the site's data with probability "
              "1/2 and Poisson-sampled like an image, through the site's own clipping, noise and accountant, with "
              f"noise calibrated for epsilon {whitebox['audit_epsilon']:g} over the run's planned rounds; scored from "
              "the model after every step, the site's own images' clipped sum taken away (Nasr et al. 2023; "
              "Steinke, Nasr and Jagielski 2023, white box). In a correct DP-SGD each canary is then an independent "
              "run of the mechanism the accountant analyses; a third of them choose thresholds, and on the rest "
              "Clopper-Pearson bounds on the error rates test the accountant's whole trade-off curve: 'NO' means "
              "they reject it (at 95% over the run's sites), i.e. the site's DP-SGD does not do what its "
              "accountant assumes. The lower bound is the largest epsilon of a DP-SGD with the same sampling and "
              "steps (its noise scaled) that the canaries reject: an assumption on the leak's shape. The one-run "
              "bound (Mahloujifar, Melis and Chaudhuri 2025) comes from a test that assumes nothing about the "
              "implementation and is weaker. The ceiling is the most these canaries "
              "can show.</p>"
            + _table(["site", "accountant epsilon", "lower bound", "bound / accountant", "one-run bound", "ceiling",
                      "TPR (low) / FPR (high)", "statistic", "consistent"], rows))


def _sweep(sweep: dict[str, Any] | None) -> str:
    if not sweep:
        return ("<p>No sweep given. <code>python -m simulations.sweep_privacy</code> writes sweep.json; pass it with "
                "<code>--sweep</code>.</p>")
    rows = [[r["arm"], r["global_accuracy"], r["mean_site_accuracy"], r["worst_site_accuracy"],
             r["max_epsilon_spent"] if r["target_epsilon"] else "not private"] for r in sweep["rows"]]
    return _table(["setting", "global acc", "mean site acc", "worst site acc", "max epsilon spent"], rows)
