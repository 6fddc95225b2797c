"""The README's Quickstart has exactly two commands, and CI runs the test one."""

import re

from helpers import ROOT


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_a_train_command_and_a_test_command():
    commands = quickstart_commands()
    assert len(commands) == 2
    train, test = commands
    assert "train.py" in train and "pytest" in test
    for command in commands:  # each sets itself up from nothing
        assert command.startswith("python3 -m venv .venv && ") and "torch==2.13.0" in command


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci
