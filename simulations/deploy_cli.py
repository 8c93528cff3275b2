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
from server.run_folder import with_run_name
from simulations.terminal import console, fail

site_app = typer.Typer(help="Partner-site tools: check a site's data before it joins a study.", no_args_is_help=True)

CERTS_EPILOG = """\
Example (coordinator; then hand each site its sites/<name>/ folder over a secure channel):

  carefed certs --out study --study chest-xray-2026 --site st-marys --site northfield \
      --superlink-host fl.example.org

  carefed certs --out study --check      # the SuperLink's certificate, and every site's identity certificate

Each site also gets an identity key (identity.key, Ed25519) and its certificate from the study CA (identity.crt:
CN = the site, the study id inside). Secure aggregation signs each round's keys with it, so a coordinator cannot
invent sites. A study folder holds one study (its id is recorded in sites.json). To renew a site's identity
certificate, move sites/<site>/identity.crt away and run again.
"""


def certs(
    out: Annotated[Path, typer.Option(help="Study folder for the CA, the SuperLink's TLS files and site keys.")],
    site: Annotated[list[str] | None, typer.Option(help="A site's name (repeatable); added if missing.")] = None,
    superlink_host: Annotated[list[str] | None, typer.Option(
        help="DNS name or IP address sites dial (repeatable; the certificate's SANs).")] = None,
    days: Annotated[int, typer.Option(help="Validity of new certificates.")] = 365,
    check: Annotated[bool, typer.Option("--check", help="Only verify the existing files.")] = False,
    study: Annotated[str | None, typer.Option(
        help="Study id the sites' identity certificates name [default: the one in sites.json, else carefed-demo].",
        show_default=False)] = None,
) -> None:
    """Make the study CA, the SuperLink's TLS certificate, and for each site a node-authentication key and an
    identity key with its certificate (keys 0600, never overwritten, never printed); write sites.json with the
    study id and the fingerprints."""
    from common.deploy.certs import StudyPaths, check_study, make_study

    paths = StudyPaths(out)
    try:
        if check:
            report = check_study(out, study=study)
            console.print(f"[green]ok[/]: {paths.server_cert} chains to {paths.ca_cert} and matches its key; "
                          f"{len(report['sites'])} site identities valid for study {report['study-id']}")
            return
        manifest = make_study(out, sites=list(site or []), hosts=list(superlink_host or ["localhost", "127.0.0.1"]),
                              days=days, study=study)
    except CareFedError as err:
        raise fail(2, str(err)) from None
    table = Table(title=f"Study keys in {out} (study {manifest['study-id']})")
    table.add_column("site")
    table.add_column("public key (register it: flwr supernode register <file> <connection>)")
    table.add_column("SHA-256 fingerprint")
    table.add_column("identity certificate SHA-256")
    for name, info in manifest["sites"].items():
        table.add_row(name, str(out / info["public-key"]), info["fingerprint-sha256"][:32] + "...",
                      info["identity-fingerprint-sha256"][:32] + "...")
    Console().print(table)
    console.print(f"SuperLink certificate for {', '.join(manifest['superlink']['names'])}, expires "
                  f"{manifest['superlink']['expires'][:10]}. Keep {paths.ca_key} offline.", soft_wrap=True)


SITE_CHECK_EPILOG = """\
Every image needs its patient's id: class folders name files <patient>_<n>.png (p0012_1.png), a CSV manifest has a
patient_id column, DICOM files carry PatientID. Images without one are refused (exit 2) unless you pass
--images-without-patient-id, which loads each as a patient of its own: those images are then protected only as
single images, even when the study's privacy unit is "patient".

Examples:

  carefed site check --data /srv/images --epsilon 3 --rounds 20

  carefed site check --data /srv/manifest.csv --scenario study.toml --json

  carefed site check --data /srv/dicom --labels /srv/labels.csv --images-without-patient-id
"""


@site_app.command("check", epilog=SITE_CHECK_EPILOG)
def site_check(
    data: Annotated[Path | None, typer.Option(
        help="Class folders, a CSV manifest, or a DICOM folder (with --labels).")] = None,
    labels: Annotated[Path | None, typer.Option(help="DICOM only: CSV of sop_instance_uid,label.")] = None,
    class_names: Annotated[str, typer.Option(help="Class names in label order, comma-separated.")] = "",
    skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Skip (and count) files that cannot "
                                                  "be read instead of failing.")] = False,
    images_without_patient_id: Annotated[bool, typer.Option(
        "--images-without-patient-id", help="Load each image without a patient id as a patient of its own instead "
        "of refusing it (it then gets only image-level protection, even at patient level).")] = False,
    scenario: Annotated[Path | None, typer.Option(help="The study's run config (scenario TOML).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="This site's epsilon budget for the whole run.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds the study plans.")] = None,
    keys: Annotated[Path | None, typer.Option(help="The site's key folder from `carefed certs` (ca.crt, node.key)"
                                              ".")] = None,
    policy: Annotated[Path | None, typer.Option(help="The site's policy file: validated, and the study checked "
                                                "against it.")] = None,
    whitebox: Annotated[int, typer.Option(help="Audit this site's own DP-SGD with this many white-box gradient "
                                               "canaries on its own images (nothing leaves the site); 0: skip.")] = 0,
    whitebox_epsilon: Annotated[float | None, typer.Option(help="The epsilon the white-box game calibrates its noise "
                                                                "for (default: the study's own).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Validate a site's policy and images before it joins: whether the study stays inside the policy; counts per
    class, patients, images per patient, images without a patient id, unreadable files, and the privacy the planned
    run would spend here (PRV accountant, the study's unit)."""
    from common.data.site import LocalDataSpec, load_deployed_site_data, load_source_for

    if data is None and policy is None:
        raise fail(2, "pass --data (the site's images), --policy (its policy file), or both")
    overrides: dict[str, Any] = {}
    if epsilon is not None:
        overrides["target-epsilon"] = epsilon
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    try:
        config = with_run_name(resolve(scenario, overrides))
        policy_report = _policy_report(policy, config) if policy is not None else {}
        if data is None:
            _print_json_or(as_json, policy_report, _print_policy_report)
            raise typer.Exit(0 if policy_report["study-allowed"] else 1)
        spec = LocalDataSpec(path=str(data), labels_csv=str(labels) if labels else "", class_names=class_names,
                             skip_unreadable=skip_unreadable, images_without_patient_id=images_without_patient_id)
        key_report = {}
        if keys is not None:
            from common.deploy.certs import check_site_keys

            key_report = {"keys": check_site_keys(keys)}
        source = load_source_for(config)  # the study's image format and classes
        channels, size, _ = source.image_shape
        site_data, summary = load_deployed_site_data(config, 0, spec, image_size=size, channels=channels,
                                                     num_classes=source.num_classes)
        report = {"data": str(data), **key_report, **policy_report, **summary, "train-images": site_data.num_train,
                  "local-test-images": int(len(site_data.test_y)), "privacy": _privacy_plan(config, site_data)}
        if whitebox:
            report["whitebox"] = _whitebox_game(config, site_data, whitebox, whitebox_epsilon)
    except CareFedError as err:
        raise fail(2, str(err)) from None
    _print_json_or(as_json, report, _print_site_report)
    if policy_report and not policy_report["study-allowed"]:
        raise typer.Exit(1)
    if whitebox and not report["whitebox"]["consistent"]:
        raise typer.Exit(1)


def _whitebox_game(config: Any, site_data: Any, canaries: int, epsilon: float | None) -> dict[str, Any]:
    """The white-box canary game on this site's own images, with the noise source a deployed site uses."""
    from client.canaries import play

    with console.status(f"White-box canaries: training with {canaries} canaries on this site's images..."):
        return play(config if epsilon is None else config.replace(target_epsilon=epsilon), site_data, canaries=canaries,
                    secure_noise=True).to_json()


def _print_json_or(as_json: bool, report: dict[str, Any], printer: Any) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        printer(report)


def _policy_report(path: Path, config: Any) -> dict[str, Any]:
    """The policy file, validated, and whether the study (its scenario) stays inside it."""
    from common.policy import PolicyRefusal, load_policy

    policy = load_policy(path)
    request = config.site_request(num_classes=2, channels=1, image_size=28)
    try:
        policy.check_study(request.study, request.privacy, request.secagg)
        refusal = ""
    except PolicyRefusal as err:
        refusal = str(err)
    return {"policy": str(path), "policy-settings": policy.to_mapping(), "study-id": config.study_id,
            "study-allowed": not refusal, "study-refusal": refusal}


def _print_policy_report(report: dict[str, Any]) -> None:
    out = Console()
    out.print(f"Policy {escape(report['policy'])}: valid", soft_wrap=True)
    table = Table(show_header=False)
    for key, value in report["policy-settings"].items():
        table.add_row(key, str(value))
    out.print(table)
    if report["study-allowed"]:
        out.print(f"[green]study {escape(report['study-id'])} as configured is within this policy[/]")
    else:
        out.print(f"[bold red]study {escape(report['study-id'])} would be refused:[/] "
                  f"{escape(report['study-refusal'])}", soft_wrap=True)


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
    if "policy" in report:
        _print_policy_report(report)
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
    without_patient = report.get("images-without-patient-id", 0)
    if without_patient:
        unit = report["privacy"].get("unit", "")
        study = f"this study's privacy unit is {unit!r}, but " if unit == "patient" else ""
        out.print(f"[yellow]{without_patient} image(s) have no patient id and were loaded as one patient each "
                  f"(--images-without-patient-id): {study}these images are protected only as single images, even at "
                  "patient level. Give them patient ids to protect each patient as a whole.[/]", soft_wrap=True)
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
    if "whitebox" in report:
        game = report["whitebox"]
        verdict = "[green]consistent[/]" if game["consistent"] else "[red]INCONSISTENT: this site's DP-SGD does not " \
                                                                      "do what its accountant assumes[/]"
        out.print(f"White-box canaries ({game['canaries']}, noise calibrated for epsilon {game['claimed_epsilon']:.2f}"
                  f" over {game['rounds']} rounds, {game['steps']} steps): epsilon >= {game['epsilon_lower_bound']:.3f}"
                  f" at 95% (one-run bound: {game['one_run_epsilon']:.3f}); the most they can show: "
                  f"{game['ceiling']:.2f}; {verdict}", soft_wrap=True)


policy_app = typer.Typer(help="The site's privacy policy: the ceiling on what any coordinator may ask.",
                         no_args_is_help=True)
site_app.add_typer(policy_app, name="policy")

POLICY_EPILOG = """\
Example (the hospital's privacy officer, once per dataset):

  carefed site policy init --out /srv/carefed/policy.toml --study chest-xray-2026 --max-epsilon 3 --lifetime 10

  carefed site check --policy /srv/carefed/policy.toml --scenario study.toml   # would this study be accepted?

Then start the SuperNode with --node-config 'policy="/srv/carefed/policy.toml" state-dir="/srv/carefed" ...'.
"""


@policy_app.command("init", epilog=POLICY_EPILOG)
def policy_init(
    out: Annotated[Path, typer.Option(help="Where to write the policy (never overwritten).")],
    study: Annotated[list[str], typer.Option(help="A study id this site joins (repeatable).")],
    max_epsilon: Annotated[float, typer.Option(help="The largest epsilon one study may spend.")] = 8.0,
    lifetime: Annotated[float, typer.Option(help="The dataset's lifetime epsilon over every study.")] = 20.0,
    max_delta: Annotated[float, typer.Option(help="The largest delta.")] = 1e-5,
    unit: Annotated[str, typer.Option(help="The minimum privacy unit: image or patient.")] = "image",
    min_cohort: Annotated[int, typer.Option(help="The fewest sites this site is aggregated with.")] = 3,
    no_evaluation_metrics: Annotated[bool, typer.Option(
        "--no-evaluation-metrics", help="Never send local test loss and accuracy.")] = False,
) -> None:
    """Write a commented site policy (TOML) with these limits; edit it by hand for the rest."""
    from common.policy import PolicyError, SitePolicy, policy_text

    if out.exists():
        raise fail(2, f"{out} exists; a policy is never overwritten (edit it, or choose another --out)")
    try:
        policy = SitePolicy(studies=tuple(study), max_epsilon_per_study=max_epsilon, lifetime_epsilon=lifetime,
                            max_delta=max_delta, min_privacy_unit=unit, min_cohort=min_cohort,
                            send_evaluation_metrics=not no_evaluation_metrics)
        policy.validate("--options")
    except PolicyError as err:
        raise fail(2, str(err)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(policy_text(policy, out.resolve()))
    console.print(f"wrote {out}; check it with `carefed site check --policy {out}`", highlight=False)


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
