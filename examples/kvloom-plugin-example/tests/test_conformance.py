"""kvloom's plugin conformance suite, run on this package's entry point."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest


def test_conformance_suite_passes(tmp_path):
    try:
        importlib.metadata.distribution("kvloom-plugin-example")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvloom-plugin-example is not installed; the conformance suite finds "
                    "plugins through installed entry points "
                    "(pip install ./examples/kvloom-plugin-example)")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--pyargs", "kvloom.testing", "--kvloom-plugin", "kvloom_example"]
    # From an empty directory, so no ini file or conftest around here changes the run.
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    output = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
