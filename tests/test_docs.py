"""Every Python example in README.md and docs/ runs, every hook is documented, and no doc
names what a reader cannot see (a folder outside the repository, a missing path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvloom import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_examples():
    for path in DOC_FILES:
        for index, match in enumerate(CODE_BLOCK.finditer(path.read_text())):
            if match.group(1).startswith("# not run in CI"):
                continue
            yield pytest.param(match.group(1), id=f"{path.name}-{index}")


@pytest.mark.parametrize("source", list(python_examples()))
def test_doc_example_runs(source, tiny_qwen2, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = source.replace("/tmp/kvloom-tiny", str(tiny_qwen2))
    source = source.replace("/tmp/engine.yaml", str(tmp_path / "engine.yaml"))
    exec(compile(source, "<doc example>", "exec"), {"__name__": "doc_example"})
    # An example that prints at top level must actually produce output.
    top_level_prints = [line for line in source.splitlines() if line.startswith("print(")]
    assert not top_level_prints or capsys.readouterr().out.strip()


def hook_names():
    return sorted(name for name in dir(hookspecs)
                  if name.startswith(("register_", "on_")) and callable(getattr(hookspecs, name)))


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_plugin_guide_section(hook):
    """docs/plugins.md: a section per hook with its signature, when it is called, its
    parameters and a runnable example (run by test_doc_example_runs)."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    heading = f"### {hook}\n"
    assert heading in guide, f"docs/plugins.md has no section for {hook}"
    section = guide.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    assert f"**Signature:** `{hook}(" in section, f"{hook}: no signature"
    for label in ("**When it is called:**", "**Parameters:**"):
        assert label in section, f"{hook}: no {label}"
    examples = CODE_BLOCK.findall(section)
    assert examples and not all(e.startswith("# not run in CI") for e in examples), (
        f"{hook}: no runnable example")


# Things a reader of the docs cannot see: the docs must stand on their own.
UNSEEN = ("/work/", "../shared", "shared folder", "device machine", "device tool", "BENCHMARKS.md")
REPO_PATH = re.compile(r"(?<![\w./-])((?:kvloom|tests|benchmarks|examples|docs)/[\w./-]*)")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.name)
def test_doc_names_only_what_a_reader_has(path):
    """No doc points at anything outside the repository, and every path in the
    repository that it names (kvloom/..., benchmarks/..., tests/...) exists."""
    text = path.read_text()
    unseen = [phrase for phrase in UNSEEN if phrase in text]
    assert not unseen, f"{path.name} speaks of what a reader cannot see: {unseen}"
    missing = sorted({ref for ref in (m.group(1).rstrip(".").split(":")[0]
                                      for m in REPO_PATH.finditer(text))
                      if not (ROOT / ref).exists()})
    assert not missing, f"{path.name} names paths the repository lacks: {missing}"
