"""The pins cannot drift: pyproject's exact pins agree with requirements.lock; the README's commands exist."""

import re
import tomllib

from tests.conftest import REPO


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_every_dependency_is_pinned_and_matches_the_lock():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    pins = _pins(declared)
    assert len(pins) == len({re.split(r"[\[=<>]", d)[0].lower() for d in declared}), "every dependency needs =="
    lock = _pins((REPO / "requirements.lock").read_text().splitlines())
    mismatched = {k: (v, lock.get(k)) for k, v in pins.items() if lock.get(k) != v}
    assert mismatched == {}
    assert pins["mosaicml"] == "0.32.1" and pins["torch"] == "2.7.0" and pins["wandb"].startswith("0.28")


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: \$\(STAMP\)", makefile, re.M) and re.search(r"^test: \$\(STAMP\)", makefile, re.M)
