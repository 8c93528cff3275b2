"""`carefed`: the command line. `carefed simulate` runs a study of virtual hospitals on this machine.

Exit codes: 0 ok, 1 the run failed, 2 bad usage or input (nothing is written then).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no calls home from a hospital

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from enum import Enum, StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from common.config import RunConfig, resolve  # noqa: E402
from common.errors import CareFedError  # noqa: E402
from server.run_folder import with_run_name  # noqa: E402
from simulations.deploy_cli import CERTS_EPILOG, certs, site_app  # noqa: E402
from simulations.terminal import console, fail  # noqa: E402

app = typer.Typer(
    name="carefed",
    help="CareFed: federated learning on medical images with DP-SGD sites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """CareFed: federated learning on medical images with DP-SGD sites."""


class Partitioning(StrEnum):
    auto = "auto"
    iid = "iid"
    dirichlet = "dirichlet"
    resample = "resample"


class Model(StrEnum):
    cnn = "cnn"
    cnn_ws = "cnn-ws"
    scatternet = "scatternet"
    resnet18 = "resnet18"


SIMULATE_EPILOG = """\
Examples:

  carefed simulate                                  # 10 hospitals, DP-SGD at epsilon 8, embedded MNIST

  carefed simulate --sites 5 --rounds 3 --epsilon 3 --partitioning dirichlet --alpha 0.3

  carefed simulate --no-dp --run-name baseline      # non-private baseline

  carefed simulate --data pneumoniamnist.npz --model resnet18

  carefed simulate --scenario simulations/scenarios/default.toml --format json

  carefed simulate --run-config "local-epochs=1 secagg-graph-degree=4 study-id='lung-2026'"   # any key, as flwr run
"""


class OutputFormat(StrEnum):
    default = "default"
    json = "json"


def _run_config_overrides(run_config: list[str] | None) -> dict[str, Any]:
    """`--run-config "key=value ..."` (repeatable) or a TOML file, parsed as `flwr run` parses it."""
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(run_config or []))
    except (ClickException, ValueError, OSError) as err:
        message = err.format_message() if isinstance(err, ClickException) else str(err)
        raise fail(2, f"--run-config: {message}") from None


def _overrides(**flags: Any) -> dict[str, Any]:
    names = {
        "sites": "num-sites", "rounds": "num-server-rounds", "per_round": "sites-per-round",
        "local_epochs": "local-epochs", "epsilon": "target-epsilon", "delta": "target-delta",
        "data": "data", "partitioning": "partitioning", "alpha": "dirichlet-alpha", "model": "model",
        "seed": "seed", "output": "output-dir", "run_name": "run-name", "batch_size": "batch-size",
        "learning_rate": "learning-rate", "clip": "max-grad-norm",
    }
    overrides = {}
    for flag, value in flags.items():
        if value is None:
            continue
        overrides[names[flag]] = value.value if isinstance(value, Enum) else value
    return overrides


@app.command(epilog=SIMULATE_EPILOG)
def simulate(
    sites: Annotated[int | None, typer.Option(help="Number of hospitals (virtual SuperNodes).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    per_round: Annotated[int | None, typer.Option(help="Sites sampled per round (0: all that can train).")] = None,
    local_epochs: Annotated[int | None, typer.Option(
        help="Local epochs per round (0: the recipe for the study's epsilon).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per site for the whole run.")] = None,
    delta: Annotated[float | None, typer.Option(help="Target delta per site.")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Non-private baseline (no clipping, no noise).")] = False,
    no_secagg: Annotated[bool, typer.Option(
        "--no-secagg", help="Send plain updates (for comparison only: the server then sees each update).")] = False,
    data: Annotated[str | None, typer.Option(
        help="'embedded', 'fashion-mnist' (Debian's dataset-fashion-mnist) or a MedMNIST-layout .npz file.")] = None,
    partitioning: Annotated[Partitioning | None, typer.Option(help="How images are split across sites.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet alpha (smaller: more label skew).")] = None,
    model: Annotated[Model | None, typer.Option(help="Model architecture.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Expected (Poisson) batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="DP-SGD step (no-DP runs: no-dp-learning-rate).")] = None,
    clip: Annotated[float | None, typer.Option(help="Per-image gradient clipping bound.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data, partitions, model init and simulated noise.")] = None,
    output: Annotated[str | None, typer.Option(help="Folder that receives runs/<run-id>/.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run id (folder name); default: time and seed.")] = None,
    scenario: Annotated[Path | None, typer.Option(help="Scenario TOML (simulations/scenarios/).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        envvar="RAY_ADDRESS", help="Run on an existing Ray cluster (host:port of its head), not a local one.")] = None,
    run_config: Annotated[list[str] | None, typer.Option(
        help="Override any run-config key, as `flwr run --run-config`: \"key=value key2='text'\" or a .toml file "
             "(applied after --scenario, before the flags above).")] = None,
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", help="'json': print the final summary as JSON on stdout.")] = OutputFormat.default,
    verbose: Annotated[bool, typer.Option(help="Flower debug logs.")] = False,
) -> None:
    """Simulate hospitals training one model with DP-SGD; write runs/<run-id>/."""
    as_json = output_format == OutputFormat.json
    flagged = _overrides(sites=sites, rounds=rounds, per_round=per_round, local_epochs=local_epochs,
                           epsilon=epsilon, delta=delta, data=data, partitioning=partitioning, alpha=alpha,
                           model=model, seed=seed, output=output, run_name=run_name, batch_size=batch_size,
                           learning_rate=learning_rate, clip=clip)
    overrides = {**_run_config_overrides(run_config), **flagged}
    if no_dp:
        overrides["dp"] = False
    if no_secagg:
        overrides["secagg"] = False
    try:
        config = with_run_name(resolve(scenario, overrides))
        from common.data.site import resolve_partitioning

        config = resolve_partitioning(config)
        if config.partitioning == "resample" and overrides.get("partitioning") != "resample":
            console.print(f"note: {config.num_sites} sites cannot each get {config.min_site_images} disjoint images "
                          "of this data, so sites are drawn from the shared pool (partitioning = resample; images "
                          "may repeat across sites)", soft_wrap=True, highlight=False)
        run_dir = Path(config.output_dir).expanduser().resolve() / config.run_name
        if run_dir.exists():
            raise fail(2, f"run folder {run_dir} already exists; choose another --run-name (runs are never "
                           "overwritten)")
    except CareFedError as err:
        raise fail(err.exit_code, str(err)) from None
    from simulations.runner import run_in_own_session

    code = run_in_own_session(run_dir, lambda: _simulate(config, run_dir, ray_address, verbose, as_json))
    if code:
        raise typer.Exit(code)


def _simulate(config: RunConfig, run_dir: Path, ray_address: str | None, verbose: bool, as_json: bool) -> int:
    """The study, in its own session (simulations.runner.run_in_own_session): its exit code."""
    from simulations.runner import run_simulation, validate_inputs

    try:
        with console.status("Checking data and partitions..."):
            validate_inputs(config)
        run_simulation(config, ray_address=ray_address, verbose=verbose)
    except CareFedError as err:  # RunInterrupted included: Flower's threads may be stuck on actors the signal
        return fail(err.exit_code, str(err)).exit_code  # killed; the session's process ends without them
    except Exception as err:  # the ServerApp's failure, already logged by Flower with its traceback
        cause = err.__cause__ or err
        return fail(1, f"the simulation failed: {type(cause).__name__}: {cause}. Run folder: {run_dir}").exit_code
    summary = _summary(run_dir, config)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["status"] == "complete" else 1


def _summary(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    status = json.loads((run_dir / "status.json").read_text())
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"] if (run_dir / "metrics.json").exists() else []
    last = rounds[-1] if rounds else {}
    return {
        "run_dir": str(run_dir),
        "status": status["state"],
        "stop_reason": status.get("stop_reason", status.get("reason")),
        "rounds": status.get("rounds"),
        "dp": config.dp,
        "secure_aggregation": config.secagg,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "delta": config.target_delta if config.dp else None,
        "global_accuracy": last.get("global-accuracy"),
        "worst_site_accuracy": last.get("worst-site-accuracy"),
        "max_epsilon": last.get("max-epsilon"),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="CareFed run", show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


AUDIT_EPILOG = """\
Examples:

  carefed audit runs/20261126-101500-seed42                 # the study: run ledger + every site ledger

  carefed audit runs/20261126-101500-seed42 --json          # machine-readable

  carefed audit /srv/carefed/site-3 --site                  # a hospital audits its own ledger

Exit codes: 0 every check passed, 1 a check failed (printed), 2 bad input.
"""


@app.command(epilog=AUDIT_EPILOG)
def audit(
    path: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>/), or with --site a site's ledger.")],
    site: Annotated[bool, typer.Option("--site", help="PATH is one site's ledger.sqlite or state folder.")] = False,
    attack: Annotated[str | None, typer.Option(help="'mia': membership inference on the final model.")] = None,
    canaries: Annotated[int, typer.Option(help="Retrain once with this many canaries (one-run audit); 0: skip.")] = 0,
    control: Annotated[bool, typer.Option(help="With --canaries, also train a no-DP control.")] = True,
    whitebox: Annotated[int, typer.Option(help="White-box gradient canaries per site: every site plays the game "
                                               "with its own DP-SGD; 0: skip.")] = 0,
    whitebox_epsilon: Annotated[float | None, typer.Option(help="The epsilon the white-box game calibrates its "
                                                                "noise for (default: the study's own).")] = None,
    shadows: Annotated[int, typer.Option(help="Shadow models for the offline LiRA attack.")] = 8,
    sweep: Annotated[Path | None, typer.Option(help="sweep.json from simulations.sweep_privacy, for the report.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the audit as JSON on stdout.")] = False,
) -> None:
    """Verify the privacy ledgers, recompute every epsilon independently, flag overruns and tampering; optionally
    attack the model (--attack mia, --canaries); write runs/<id>/report.html."""
    from common.privacy.audit import audit_run, audit_site
    from common.privacy.ledger import LedgerError

    if not path.exists():
        raise fail(2, f"{path} does not exist; pass a run folder (runs/<run-id>/) or, with --site, a site ledger")
    if attack not in (None, "mia"):
        raise fail(2, f"--attack {attack!r} is not known; use --attack mia")
    if site and (attack or canaries or whitebox):
        raise fail(2, "--attack, --canaries and --whitebox need the run folder (they train on the sites' data); a "
                      "deployed site audits its own DP-SGD on its own images with `carefed site check --data DIR "
                      "--whitebox 4000`")
    if whitebox:
        _check_whitebox(whitebox, whitebox_epsilon)
    if canaries < 0 or shadows < 2 or (sweep is not None and not sweep.is_file()):
        raise fail(2, "--canaries must be >= 0, --shadows >= 2, and --sweep must name an existing sweep.json")
    try:
        with console.status("Verifying ledgers and recomputing epsilon..."):
            report = audit_site(path) if site else audit_run(path)
    except (FileNotFoundError, LedgerError) as err:
        raise fail(2, str(err)) from None
    extra: dict[str, Any] = {}
    if not site:
        from simulations.empirical_audit import canary_audit, membership_inference, whitebox_audit
        from simulations.report import write_report

        try:
            if attack == "mia":
                with console.status("Membership inference: training shadow models and scoring every site..."):
                    extra["mia"] = membership_inference(path, shadows)
            if canaries:
                with console.status(f"One-run audit: retraining with {canaries} canaries..."):
                    extra["canaries"] = canary_audit(path, canaries, control)
                for name, arm in extra["canaries"]["arms"].items():
                    if not arm["consistent"]:
                        report.problems.append(f"canary run '{name}': empirical epsilon lower bound "
                                               f"{arm['epsilon_lower_bound']:.3f} exceeds the theoretical "
                                               f"{arm['theoretical_epsilon']}: the DP guarantee does not hold")
            if whitebox:
                with console.status(f"White-box canaries: every site trains with {whitebox} canaries..."):
                    extra["whitebox"] = whitebox_audit(path, whitebox, whitebox_epsilon)
                report.problems += [
                    f"site {site_}: white-box canaries reject the privacy its accountant claims (epsilon "
                    f"{r['claimed_epsilon']:.3f}; they show epsilon >= {r['epsilon_lower_bound']:.3f}): its DP-SGD "
                    "does not do what the accountant assumes" for site_, r in extra["whitebox"]["sites"].items()
                    if not r["consistent"]]
        except (FileNotFoundError, CareFedError) as err:
            raise fail(2, str(err)) from None
        extra["report"] = str(write_report(path, report, sweep))
    if as_json:
        print(json.dumps(_clean_json({**report.to_json(), **extra}), indent=2))
    else:
        _print_audit(report)
        _print_empirical(extra)
    raise typer.Exit(0 if report.ok else 1)


def _check_whitebox(canaries: int, epsilon: float | None) -> None:
    """Whether this many canaries can fail the study's DP-SGD is known once a site's plan is (client.canaries.play)."""
    from common.policy import MAX_STUDY_EPSILON

    if canaries < 1 or (epsilon is not None and not 0 < epsilon <= MAX_STUDY_EPSILON):
        raise fail(2, f"--whitebox must be >= 1 and --whitebox-epsilon in (0, {MAX_STUDY_EPSILON:g}]")


def _print_empirical(extra: dict[str, Any]) -> None:
    out = Console(width=max(Console().width, 110))
    if "mia" in extra:
        pooled = extra["mia"]["pooled"]
        for attack, label in (("loss", "loss threshold"), ("lira", "offline LiRA")):
            v = pooled[attack]
            out.print(f"membership inference ({label}, all sites): AUC {v['auc']:.3f}, TPR@1%FPR "
                      f"{v['tpr_at_1pct_fpr']:.3f}, TPR@0.1%FPR {v['tpr_at_01pct_fpr']:.3f} "
                      f"({v['members']} members, {v['non_members']} non-members)")
    if "canaries" in extra:
        for name, arm in extra["canaries"]["arms"].items():
            theory = f"theoretical epsilon {arm['theoretical_epsilon']}" if arm["dp"] else "no DP"
            out.print(f"canaries ({name}): {arm['correct']}/{arm['guesses']} guesses right, epsilon lower bound "
                      f"{arm['epsilon_lower_bound']:.3f} at 95% ({theory}); the most this audit can certify with "
                      f"{extra['canaries']['canaries']} canaries is {arm.get('ceiling', math.nan):.2f}")
    if "whitebox" in extra:
        for site_, r in extra["whitebox"]["sites"].items():
            out.print(f"white-box canaries, site {site_}: epsilon >= {r['epsilon_lower_bound']:.3f} at 95% "
                      f"({r['score']}; one-run bound: {r['one_run_epsilon']:.3f}), accountant "
                      f"{r['claimed_epsilon']:.3f} (ratio {r['bound_over_claimed']:.2f}); the most {r['canaries']} "
                      f"canaries can show: {r['ceiling']:.2f}; "
                      f"{'consistent' if r['consistent'] else 'INCONSISTENT: the canaries reject its trade-off curve'}")
    if "report" in extra:
        out.print(f"report: {extra['report']}")


def _clean_json(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _print_audit(report: Any) -> None:
    out = Console(width=max(Console().width, 110))
    rows = [r for r in report.rows if r.source == "run"] or report.rows
    table = Table(title=f"Privacy spent per round and site, over the whole run so far ({rows[0].source} ledger)"
                  if rows else "No ledger entries")
    for column in ("round", "site", "unit", "delta", "eps PRV (logged)", "eps PLD (recomputed)",
                   "eps patient (k imgs)", "budget", "q", "sigma", "steps", "flags"):
        table.add_column(column, justify="left" if column in ("unit", "flags") else "right")
    for row in rows:
        patient = "-" if row.epsilon_patient is None else f"{row.epsilon_patient:.2f} ({row.images_per_patient})"
        table.add_row(str(row.round), str(row.site), row.unit, f"{row.delta:g}", f"{row.epsilon_logged:.3f}",
                      f"{row.epsilon_recomputed:.3f}", patient, f"{row.budget:g}", f"{row.sample_rate:.4f}",
                      f"{row.noise_multiplier:.3f}", str(row.steps_total), ",".join(row.flags) or "ok")
    out.print(table)
    _print_lifetime(out, report)
    for ledger in report.ledgers:
        state = "[green]chain ok[/]" if ledger["chain_ok"] else "[red]CHAIN BROKEN[/]"
        out.print(f"{ledger['source']:>4} ledger {ledger['path']}: {ledger['entries']} entries, {state}",
                  soft_wrap=True)
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    for problem in report.problems:
        out.print(f"[bold red]FAIL:[/] {escape(problem)}", soft_wrap=True)
    out.print("[bold green]audit passed[/]: chains intact, every epsilon recomputed within 1%, no budget overrun"
              if report.ok else f"[bold red]audit failed: {len(report.problems)} problem(s)[/]")


def _print_lifetime(out: Console, report: Any) -> None:
    """A site's spend per study and over its dataset's lifetime (recomputed with PLD), and what it refused."""
    for site in report.lifetime:
        table = Table(title=f"Privacy spent by the dataset of {site['path']} ({site['runs']} run(s))")
        for column in ("study", "runs", "delta", "eps PLD (recomputed)"):
            table.add_column(column, justify="left" if column == "study" else "right")
        for study, info in site["studies"].items():
            table.add_row(study, str(len(info["runs"])), f"{info['delta']:g}", f"{info['epsilon_recomputed']:.3f}")
        recomputed = site["lifetime_epsilon_recomputed"]
        table.add_row("[bold]lifetime[/]", str(site["runs"]), f"{site['delta']:g}",
                      "-" if recomputed is None else f"{recomputed:.3f} (logged {site['lifetime_epsilon_logged']:.3f},"
                      f" budget {site['budget']:g})")
        out.print(table)
    for refusal in report.refusals:
        out.print(f"refused: run {escape(refusal['run_id'] or '?')} (study {escape(refusal['study'] or '?')}), "
                  f"round {refusal['round']}: {escape(refusal['reason'])}", soft_wrap=True)


app.command(epilog=CERTS_EPILOG)(certs)
app.add_typer(site_app, name="site")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
