"""`carefed`: the command line. `carefed simulate` runs a study of virtual hospitals on this machine.

Exit codes: 0 ok, 1 the run failed, 2 bad usage or input (nothing is written then).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no calls home from a hospital

import json  # noqa: E402
import sys  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from enum import Enum, StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common.config import RunConfig, resolve  # noqa: E402
from common.errors import CareFedError  # noqa: E402

app = typer.Typer(
    name="carefed",
    help="CareFed: federated learning on medical images with DP-SGD sites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """CareFed: federated learning on medical images with DP-SGD sites."""


class Partitioning(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"


class Model(StrEnum):
    cnn = "cnn"
    resnet18 = "resnet18"


SIMULATE_EPILOG = """\
Examples:

  carefed simulate                                  # 10 hospitals, DP-SGD at epsilon 8, embedded MNIST

  carefed simulate --sites 5 --rounds 3 --epsilon 3 --partitioning dirichlet --alpha 0.3

  carefed simulate --no-dp --run-name baseline      # non-private baseline

  carefed simulate --data pneumoniamnist.npz --model resnet18

  carefed simulate --scenario simulations/scenarios/default.toml --json
"""


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


def _fail(code: int, message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command(epilog=SIMULATE_EPILOG)
def simulate(
    sites: Annotated[int | None, typer.Option(help="Number of hospitals (virtual SuperNodes).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    per_round: Annotated[int | None, typer.Option(help="Sites sampled per round (0: all that can train).")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per site for the whole run.")] = None,
    delta: Annotated[float | None, typer.Option(help="Target delta per site.")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Non-private baseline (no clipping, no noise).")] = False,
    no_secagg: Annotated[bool, typer.Option(
        "--no-secagg", help="Send plain updates (for comparison only: the server then sees each update).")] = False,
    data: Annotated[str | None, typer.Option(help="'embedded' or a MedMNIST-layout .npz file.")] = None,
    partitioning: Annotated[Partitioning | None, typer.Option(help="How images are split across sites.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet alpha (smaller: more label skew).")] = None,
    model: Annotated[Model | None, typer.Option(help="Model architecture.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Expected (Poisson) batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Local SGD learning rate.")] = None,
    clip: Annotated[float | None, typer.Option(help="Per-image gradient clipping bound.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data, partitions, model init and simulated noise.")] = None,
    output: Annotated[str | None, typer.Option(help="Folder that receives runs/<run-id>/.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run id (folder name); default: time and seed.")] = None,
    scenario: Annotated[Path | None, typer.Option(help="Scenario TOML (simulations/scenarios/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option(help="Flower debug logs.")] = False,
) -> None:
    """Simulate hospitals training one model with DP-SGD; write runs/<run-id>/."""
    overrides = _overrides(sites=sites, rounds=rounds, per_round=per_round, local_epochs=local_epochs,
                           epsilon=epsilon, delta=delta, data=data, partitioning=partitioning, alpha=alpha,
                           model=model, seed=seed, output=output, run_name=run_name, batch_size=batch_size,
                           learning_rate=learning_rate, clip=clip)
    if no_dp:
        overrides["dp"] = False
    if no_secagg:
        overrides["secagg"] = False
    try:
        config = resolve(scenario, overrides)
        if not config.run_name:
            config = config.replace(run_name=f"{datetime.now(UTC):%Y%m%d-%H%M%S}-seed{config.seed}")
        run_dir = Path(config.output_dir).expanduser().resolve() / config.run_name
        if run_dir.exists():
            raise _fail(2, f"run folder {run_dir} already exists; choose another --run-name (runs are never "
                           "overwritten)")
        from simulations.runner import run_simulation, validate_inputs

        with console.status("Checking data and partitions..."):
            validate_inputs(config)
    except CareFedError as err:
        raise _fail(err.exit_code, str(err)) from None

    try:
        run_simulation(config, verbose=verbose)
    except CareFedError as err:
        raise _fail(err.exit_code, str(err)) from None
    except Exception as err:  # the ServerApp's failure, already logged by Flower with its traceback
        cause = err.__cause__ or err
        raise _fail(1, f"the simulation failed: {type(cause).__name__}: {cause}. Run folder: {run_dir}") from None
    summary = _summary(run_dir, config)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if summary["status"] != "complete":
        raise typer.Exit(1)


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


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
