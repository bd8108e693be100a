"""``import recbole_mm`` chooses libgomp's spin count before torch loads, unless the user chose a wait setting.

Each case runs in a fresh interpreter: libgomp reads ``GOMP_SPINCOUNT`` once, when torch is imported,
so what counts is the variable's value at that moment (recorded by an import hook).
"""

import os
import subprocess
import sys

import pytest

PROBE = """
import importlib.abc, os, sys
seen = []
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Probe())
{first}
import recbole_mm
print(seen[0] if seen else "torch-not-imported", os.environ.get("GOMP_SPINCOUNT"))
"""


def _probe(env_extra, first=""):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()[-2:]


def test_spin_count_is_set_before_torch_loads():
    assert _probe({}) == ["10000", "10000"]


@pytest.mark.parametrize("variable, value, expected", [
    ("GOMP_SPINCOUNT", "500", ["500", "500"]),      # the user's count stays
    ("OMP_WAIT_POLICY", "PASSIVE", ["None", "None"]),  # a chosen policy is not overridden by a count
])
def test_a_users_own_setting_is_kept(variable, value, expected):
    assert _probe({variable: value}) == expected


def test_nothing_is_set_once_torch_is_loaded():
    """Too late to matter to libgomp, so the environment is left as the user had it."""
    assert _probe({}, first="import torch") == ["None", "None"]
