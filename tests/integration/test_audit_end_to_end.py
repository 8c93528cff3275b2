"""The audit of a real simulated run: ledgers, membership inference, the one-run canary audit, the report page
rendered in headless Chromium with every image loaded."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import carefed

pytestmark = [pytest.mark.slow, pytest.mark.long]


def render_in_chromium(page: Path) -> str:
    """Headless Chromium (Debian's package; `make test` installs it) loads the page and returns the DOM."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for this test: apt-get install chromium (make test does it)"
    profile = page.parent / ".chromium-profile"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_audit_attacks_and_report_of_a_small_study(tmp_path: Path):
    # a small study that trains long enough for a non-private model to memorise (the control must show leakage)
    sim = carefed("simulate", "--sites", "3", "--rounds", "3", "--local-epochs", "10", "--no-secagg",
                  "--run-name", "study", "--output", str(tmp_path), cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr[-3000:]
    run = tmp_path / "study"

    result = carefed("audit", str(run), "--attack", "mia", "--shadows", "2", "--canaries", "300", "--json",
                     cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    audit = json.loads(result.stdout)
    assert audit["ok"]

    mia = audit["mia"]
    for attack in ("loss", "lira"):
        pooled = mia["pooled"][attack]
        assert 0.0 <= pooled["auc"] <= 1.0 and pooled["members"] > pooled["non_members"] > 0
        assert 0.0 <= pooled["tpr_at_01pct_fpr"] <= pooled["tpr_at_1pct_fpr"] <= 1.0
    assert set(mia["per_site"]) == {"0", "1", "2"}

    arms = audit["canaries"]["arms"]
    assert arms["as-run"]["dp"] and not arms["no-dp-control"]["dp"]
    assert arms["as-run"]["epsilon_lower_bound"] <= arms["as-run"]["theoretical_epsilon"]  # DP holds empirically
    assert arms["no-dp-control"]["epsilon_lower_bound"] > 0.5  # without DP the audit sees the canaries
    assert (run / "audit" / "mia.json").is_file() and (run / "audit" / "canaries.json").is_file()
    assert arms["as-run"]["ceiling"] >= arms["as-run"]["epsilon_lower_bound"]

    dom = render_in_chromium(run / "report.html")
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert total >= 4 and loaded == total  # accuracy, fairness, epsilon, MIA ROC
    for section in ("Ledger verification", "Audit passed", "Membership inference", "One-run canary audit",
                    "Per-site accuracy"):
        assert section in dom
