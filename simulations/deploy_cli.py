"""`carefed certs` and `carefed site check`: what a coordinator and a partner site run before a deployed study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.config import resolve
from common.errors import CareFedError
from simulations.terminal import console, fail

site_app = typer.Typer(help="Partner-site tools: check a site's data before it joins a study.", no_args_is_help=True)

CERTS_EPILOG = """\
Example (coordinator; then hand each site its sites/<name>/ folder over a secure channel):

  carefed certs --out study --site st-marys --site northfield --superlink-host fl.example.org

  carefed certs --out study --check      # expiry, chain and key of the SuperLink's certificate
"""


def certs(
    out: Annotated[Path, typer.Option(help="Study folder for the CA, the SuperLink's TLS files and site keys.")],
    site: Annotated[list[str] | None, typer.Option(help="A site's name (repeatable); added if missing.")] = None,
    superlink_host: Annotated[list[str] | None, typer.Option(
        help="DNS name or IP address sites dial (repeatable; the certificate's SANs).")] = None,
    days: Annotated[int, typer.Option(help="Validity of new certificates.")] = 365,
    check: Annotated[bool, typer.Option("--check", help="Only verify the existing files.")] = False,
) -> None:
    """Make the study CA, the SuperLink's TLS certificate and each site's node-authentication key (0600, never
    overwritten, never printed); write sites.json with the public keys' fingerprints."""
    from common.deploy.certs import StudyPaths, check_tls_files, make_study

    paths = StudyPaths(out)
    try:
        if check:
            check_tls_files(ca=paths.ca_cert, cert=paths.server_cert, key=paths.server_key)
            console.print(f"[green]ok[/]: {paths.server_cert} chains to {paths.ca_cert} and matches its key")
            return
        manifest = make_study(out, sites=list(site or []), hosts=list(superlink_host or ["localhost", "127.0.0.1"]),
                              days=days)
    except CareFedError as err:
        raise fail(2, str(err)) from None
    table = Table(title=f"Study keys in {out}")
    table.add_column("site")
    table.add_column("public key (register it: flwr supernode register <file> <connection>)")
    table.add_column("SHA-256 fingerprint")
    for name, info in manifest["sites"].items():
        table.add_row(name, str(out / info["public-key"]), info["fingerprint-sha256"][:32] + "...")
    Console().print(table)
    console.print(f"SuperLink certificate for {', '.join(manifest['superlink']['names'])}, expires "
                  f"{manifest['superlink']['expires'][:10]}. Keep {paths.ca_key} offline.", soft_wrap=True)


@site_app.command("check")
def site_check(
    data: Annotated[Path, typer.Option(help="Class folders, a CSV manifest, or a DICOM folder (with --labels).")],
    labels: Annotated[Path | None, typer.Option(help="DICOM only: CSV of sop_instance_uid,label.")] = None,
    class_names: Annotated[str, typer.Option(help="Class names in label order, comma-separated.")] = "",
    skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Skip (and count) files that cannot "
                                                  "be read instead of failing.")] = False,
    scenario: Annotated[Path | None, typer.Option(help="The study's run config (scenario TOML).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="This site's epsilon budget for the whole run.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds the study plans.")] = None,
    keys: Annotated[Path | None, typer.Option(help="The site's key folder from `carefed certs` (ca.crt, node.key)"
                                              ".")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Validate a site's images before it joins: counts per class, patients, images per patient, unreadable files,
    and the privacy the planned run would spend here (PRV accountant, the study's unit)."""
    from common.data.site import LocalDataSpec, load_deployed_site_data

    overrides: dict[str, Any] = {}
    if epsilon is not None:
        overrides["target-epsilon"] = epsilon
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    try:
        config = resolve(scenario, overrides)
        spec = LocalDataSpec(path=str(data), labels_csv=str(labels) if labels else "", class_names=class_names,
                             skip_unreadable=skip_unreadable)
        key_report = {}
        if keys is not None:
            from common.deploy.certs import check_site_keys

            key_report = {"keys": check_site_keys(keys)}
        site_data, summary = load_deployed_site_data(config, 0, spec)
        report = {"data": str(data), **key_report, **summary, "train-images": site_data.num_train,
                  "local-test-images": int(len(site_data.test_y)), "privacy": _privacy_plan(config, site_data)}
    except CareFedError as err:
        raise fail(2, str(err)) from None
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_site_report(report)


def _privacy_plan(config, data) -> dict[str, Any]:
    """Calibrate this site's noise exactly as the ClientApp will, and the epsilon after each planned round."""
    import warnings

    from client.site import calibrate_site

    if not config.dp:
        return {"dp": False}
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    privacy = calibrate_site(config, data, 0)
    per_round = []
    for _ in range(config.planned_rounds):
        per_round.append(round(privacy.epsilon_after_next_round(), 4))
        privacy.history = privacy.accountant(privacy.steps_per_round).history
    return {"dp": True, "unit": config.privacy_unit, "accountant": "PRV (Opacus)", "delta": config.target_delta,
            "budget": privacy.target_epsilon, "noise-multiplier": privacy.noise_multiplier,
            "sample-rate": privacy.sample_rate, "steps-per-round": privacy.steps_per_round,
            "epsilon-after-round": per_round}


def _print_site_report(report: dict[str, Any]) -> None:
    out = Console()
    out.print(f"Site data: {escape(report['data'])} ({report['layout']})", soft_wrap=True)
    table = Table()
    table.add_column("label", justify="right")
    table.add_column("images", justify="right")
    for label, count in report["per_class"].items():
        table.add_row(str(label), str(count))
    out.print(table)
    per_patient = report["images_per_patient"]
    out.print(f"{report['images']} images from {report['patients']} patients (images per patient: min "
              f"{per_patient['min']}, median {per_patient['median']:g}, max {per_patient['max']}); "
              f"{report['train-images']} train, {report['local-test-images']} local test (split by patient)")
    if report["unreadable"]:
        out.print(f"[yellow]{report['unreadable']} unreadable file(s) skipped:[/]")
        for item in report["unreadable_files"][:20]:
            out.print(f"  {escape(item['path'])}: {escape(item['reason'])}", soft_wrap=True)
    if "keys" in report:
        out.print(f"Keys ok: node key {report['keys']['node-key-fingerprint-sha256'][:16]}..., study CA valid until "
                  f"{report['keys']['ca-expires'][:10]}")
    plan = report["privacy"]
    if plan["dp"]:
        out.print(f"Privacy ({plan['unit']}-level, {plan['accountant']}, delta {plan['delta']:g}): noise "
                  f"{plan['noise-multiplier']:.3f}, sample rate {plan['sample-rate']:.4f}, "
                  f"{plan['steps-per-round']} steps per round; epsilon after each planned round: "
                  + ", ".join(f"{e:.2f}" for e in plan["epsilon-after-round"])
                  + f" (budget {plan['budget']:g})")


@site_app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder that receives one image folder per site.")],
    site: Annotated[list[str], typer.Option(help="A site's name (repeatable), in site-id order.")],
) -> None:
    """Write each site's share of the embedded data as real image files (<out>/<site>/<label>/p<patient>_<n>.png),
    for rehearsing a deployment on one machine (docker/compose.yml, simulations/loopback.py)."""
    from common.deploy.demo_data import write_site_folders

    existing = [name for name in site if (out / name).exists()]
    if existing:
        raise fail(2, f"{out / existing[0]} exists; choose another --out (site folders are never overwritten)")
    counts = write_site_folders(resolve(), out, list(site))
    for name, count in counts.items():
        console.print(f"{name}: {count} images in {out / name}")
