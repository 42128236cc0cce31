"""The plugin conformance suite (kvloom.testing), run the way a plugin author runs it:
``pytest --pyargs kvloom.testing``. It passes on every built-in plugin, and it fails a
plugin that breaks a rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from kvloom import make_plugin_manager
from kvloom.registry import PLUGIN_KINDS, Registries

MUTANTS = Path(__file__).parent / "data" / "kvloom_conformance_mutants.py"
# Skips the suite may report here (no GPU in CI), by the start of their reason.
EXPECTED_SKIPS = ("platform 'cuda' cannot run here",
                  "attention backend 'triton' cannot run this shape: bfloat16 needs a CUDA",
                  "attention backend 'cuda_paged' cannot run this shape: needs a CUDA device",
                  "attention backend 'flash_attn' cannot run this shape: needs a CUDA device")


def run_suite(tmp_path: Path, *args: str, pythonpath: str | None = None) -> dict[str, tuple]:
    """test id -> (outcome, message) from one run of the suite in a fresh process."""
    report = tmp_path / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--pyargs", "kvloom.testing", f"--junitxml={report}", *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        found = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = found[0].tag if found else "passed"
        message = found[0].get("message", "") if found else ""
        outcomes[case.get("name")] = (outcome, message)
    return outcomes


def test_suite_passes_on_every_builtin_plugin(tmp_path):
    outcomes = run_suite(tmp_path)
    problems = {name: result for name, result in outcomes.items()
                if result[0] in ("failure", "error")
                or (result[0] == "skipped"
                    and not any(reason in result[1] for reason in EXPECTED_SKIPS))}
    assert not problems, problems
    registries = Registries(make_plugin_manager())
    for kind in PLUGIN_KINDS:
        if kind == "loader":  # loaders are exercised through the model checks
            continue
        for name, component in registries[kind].components.items():
            label = f"[{component.plugin_name}:{name}"
            passed = [test for test, (outcome, _) in outcomes.items() if outcome == "passed"
                      and (label + "]" in test or label + "-" in test)]
            assert passed or kind == "platform" and name == "cuda", f"nothing passed for {label}]"


def test_suite_fails_plugins_that_break_the_rules(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(MUTANTS, site / MUTANTS.name)
    dist_info = site / "kvloom_conformance_mutants-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kvloom-conformance-mutants\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[kvloom]\nmutants = kvloom_conformance_mutants\n")
    outcomes = run_suite(tmp_path, "--kvloom-plugin", "mutants", pythonpath=str(site))
    failed = {name for name, (outcome, _) in outcomes.items() if outcome in ("failure", "error")}
    expected = {
        "test_draws_follow_the_filtered_distribution[mutants:mutant_sampler-top_p-0.6]",
        "test_matches_dense_attention[mutants:mutant_attention-gqa4-d64-fp32]",
        "test_every_checkpoint_tensor_is_consumed[mutants:SkipsFinalNormForCausalLM]",
        "test_drafts_are_within_limits_and_change_no_token[mutants:mutant_drafter]",
        "test_accept_bitmask_rollback_terminate[mutants:mutant_grammar-regex]",
        "test_kv_cache_memory[mutants:mutant_platform]",
    }
    assert expected <= failed, sorted(failed)
    # The check itself fails it, not only the engine's own loader (which refuses it too).
    consumed = outcomes["test_every_checkpoint_tensor_is_consumed[mutants:SkipsFinalNormForCausalLM]"]
    assert consumed[0] == "failure" and "model.norm.weight" in consumed[1], consumed
    # The rules they keep still pass: e.g. the sampler is greedy where asked.
    assert outcomes["test_greedy_is_argmax[mutants:mutant_sampler]"][0] == "passed"
