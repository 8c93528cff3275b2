"""docker/ cannot run here (no Docker daemon). What can be checked is checked: the files parse, the images are
Flower's official ones for the pinned flwr, every repository path they copy or mount exists (or is made by the
documented `carefed` command), and the processes they start get the same flags the loopback deployment test runs,
which Flower's own argument parsers accept."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from common.config import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
GENERATED = {"study", "data", "policies"}  # by carefed certs, site demo-data and site policy init


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _pinned_flwr() -> str:
    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("flwr["))


@pytest.mark.parametrize(("dockerfile", "base"), [("coordinator.Dockerfile", "superlink"),
                                                  ("hospital.Dockerfile", "supernode")])
def test_images_build_on_flowers_official_image_of_the_pinned_version(dockerfile: str, base: str):
    text = (DOCKER / dockerfile).read_text()
    assert re.search(rf"^FROM flwr/{base}:{re.escape(_pinned_flwr())}$", text, re.M)
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (PROJECT_ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    for pin in re.findall(r"(torch(?:vision)?==[\d.]+)", text):
        assert pin in (PROJECT_ROOT / "pyproject.toml").read_text()


def test_compose_mounts_existing_or_documented_paths_and_keeps_data_read_only():
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith("."):
                first = Path(source).parts[0] if Path(source).parts[0] != "." else Path(source).parts[1]
                assert first in GENERATED or (DOCKER / source).exists(), f"{name} mounts missing {source}"
                if first in GENERATED:
                    assert mode == ["ro"], f"{name}: keys and images are mounted read-only ({volume})"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    for site in ("site-0", "site-1", "site-2"):
        assert any(v.endswith(":/app/site/state") and not v.startswith(".") for v in compose["services"][site]
                   ["volumes"]), "a hospital's ledger lives in a named volume"


def _flags(arguments: list[str]) -> set[str]:
    return {a.split("=")[0] for a in arguments if a.startswith("--")}


def _parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_the_containers_run_the_loopback_tests_commands_and_flower_accepts_every_flag(tmp_path: Path):
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from simulations.loopback import LoopbackDeployment

    services = _compose()["services"]
    loopback = LoopbackDeployment(tmp_path, ["site-0"])
    superlink = _flags(services["superlink"]["command"])
    assert superlink == _flags(loopback.superlink_command()[1:])
    assert superlink <= _parser_flags(_parse_args_run_superlink())
    hospital = (DOCKER / "hospital.Dockerfile").read_text()
    assert 'ENTRYPOINT ["carefed-supernode"]' in hospital  # the site's own CareFed runs, not the coordinator's app
    assert Path(loopback.supernode_command("site-0", 0)[0]).name == "carefed-supernode"
    for site in ("site-0", "site-1", "site-2"):
        assert "--host=127.0.0.1" in services[site]["command"]  # the Runtime API stays inside the container
        supernode = _flags(services[site]["command"])
        assert supernode == _flags(loopback.supernode_command("site-0", 0)[1:]) - {"--max-retries"}
        assert supernode <= _parser_flags(_parse_args_run_supernode())
        config = next(a for a in services[site]["command"] if a.startswith("--node-config="))
        assert f"site-id={site[-1]} " in config and 'data="/app/site/data"' in config
        assert 'policy="/app/site/policy.toml"' in config and 'state-dir="/app/site/state"' in config
        assert any(v.endswith(":/app/site/policy.toml:ro") for v in services[site]["volumes"])


def test_the_coordinators_cli_config_names_the_study_connection():
    for home in ("flwr-home", "flwr-home-compose"):
        config = tomllib.loads((DOCKER / home / "config.toml").read_text())
        connection = config["superlink"][config["superlink"]["default"]]
        assert connection["root-certificates"].endswith("superlink/ca.crt") and ":9091" in connection["address"]
