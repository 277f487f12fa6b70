"""The documented contract matches the code: config keys, README commands, CI command."""

import dataclasses
from pathlib import Path

from fedpeft.config import Config
from fedpeft.methods import get_method_class, method_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented():
    doc = (ROOT / "docs" / "config.md").read_text()
    for section in dataclasses.fields(Config):
        assert f"## [{section.name}]" in doc
        if section.name == "method":
            continue
        for f in dataclasses.fields(section.default_factory()):
            assert f"| `{f.name}` |" in doc, f"{section.name}.{f.name} missing from docs/config.md"
    for name in method_names():
        for f in dataclasses.fields(get_method_class(name).Options):
            assert f"| `{name}` | `{f.name}` |" in doc, f"method {name}.{f.name} missing from docs/config.md"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert 'pip install -e ".[dev]"' in readme and "fedpeft run examples/quickstart.toml" in readme
    test_command = readme.split("## Run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert test_command in [line.strip() for line in ci], f"{test_command!r} is not a line of .ci/run"
    assert any("torch==2.13.0" in line for line in ci)


def test_every_example_config_is_valid():
    from fedpeft.config import load_config

    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        cfg = load_config(path)
        assert cfg.federation.rounds >= 1, path


def test_every_image_the_docs_show_exists():
    import re

    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).is_file(), f"{doc.name} shows {target}, which does not exist"
