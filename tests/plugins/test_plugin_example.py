"""examples/kvloom-plugin-example as a user gets it: pip-installed into a fresh virtual
environment, selected by name from an engine.yaml, and checked by its own tests, which
run the conformance suite on it."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import textwrap
import venv
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvloom-plugin-example"

GENERATE = textwrap.dedent("""
    import json, sys
    from kvloom import LLM, SamplingParams

    llm = LLM.from_config(sys.argv[1])
    runner = llm.engine.components.runner
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": [5, 17, 42, 99]}, "Hello, my name is"], params)
    print(json.dumps({
        "attention": llm.engine.components.attention_name,
        "sampler_module": type(runner.sampler).__module__,
        "tokens": [output.outputs[0].token_ids for output in outputs],
    }))
""")


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{(result.stdout + result.stderr)[-5000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def example_venv(tmp_path_factory) -> Path:
    """A virtual environment with the example installed by pip. It sees this
    environment's packages (kvloom, torch, pip, setuptools...) through a .pth file, so
    nothing is downloaded; the example itself is installed into the venv only."""
    root = tmp_path_factory.mktemp("example_venv")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                              "['purelib'])"], root).strip())
    parents = [*site.getsitepackages(), site.getusersitepackages()]
    (venv_site / "parent_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    source = root / "kvloom-plugin-example"  # a copy: building writes into the source tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                   "__pycache__"))
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(source)], root)
    return python


def test_example_is_listed_and_selected_from_engine_yaml(example_venv, tiny_qwen2, tmp_path):
    plugins = run([str(example_venv), "-c", "from kvloom.entrypoints.cli import main; "
                                            "raise SystemExit(main(['plugins']))"], tmp_path)
    rows = [line.split() for line in plugins.splitlines()]
    assert ["sampler", "fast_nucleus", "kvloom_example"] in [row[:3] for row in rows]
    assert ["attention", "sdpa_batched", "kvloom_example"] in [row[:3] for row in rows]
    assert any(row[:3] == ["sampler", "fast_nucleus", "kvloom_example"]
               and "kvloom-plugin-example" in row for row in rows)

    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    results = {}
    for name, extra in (("example", "attention: sdpa_batched\nsampler: fast_nucleus\n"),
                        ("builtin", "attention: torch\n")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"model: {tiny_qwen2}\ndtype: float32\nmax_model_len: 64\n{extra}")
        results[name] = json.loads(run([str(example_venv), str(script), str(config)],
                                       tmp_path).splitlines()[-1])
    assert results["example"]["attention"] == "sdpa_batched"
    assert results["example"]["sampler_module"].startswith("kvloom_plugin_example.")
    assert results["builtin"]["sampler_module"].startswith("kvloom.plugins.")
    assert results["example"]["tokens"] == results["builtin"]["tokens"]


def test_example_tests_pass_with_the_conformance_suite(example_venv, tmp_path):
    report = tmp_path / "report.xml"
    tests = example_venv.parents[2] / "kvloom-plugin-example" / "tests"
    run([str(example_venv), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}", str(tests)], tmp_path)
    outcomes = {case.get("name"): [child.tag for child in case]
                for case in ElementTree.parse(report).iter("testcase")}
    assert outcomes["test_conformance_suite_passes"] == [], (
        "the conformance run was skipped or failed: "
        f"{outcomes['test_conformance_suite_passes']}")
    assert len(outcomes) > 10 and all(not tags for tags in outcomes.values()), outcomes


def test_example_passes_the_conformance_suite_directly(example_venv, tmp_path):
    """The command a plugin author runs, with TRITON_INTERPRET unset: nothing of the
    example needs Triton."""
    output = run([str(example_venv), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "--pyargs", "kvloom.testing", "--kvloom-plugin", "kvloom_example", "-rs"],
                 tmp_path)
    summary = output.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" not in summary, output
