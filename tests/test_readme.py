"""The README's promises that code can check: the Space's front matter lists every hub checkpoint the
presets name and the Python CI runs, and CI runs the README's test command word for word."""

import re
import sys

import gradio

from pipeline.models import HUB_PRESETS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
FRONT = README.split("---\n")[1]


def test_front_matter_lists_every_preset_checkpoint():
    models = re.findall(r"^  - (\S+)$", FRONT, re.MULTILINE)
    assert sorted(models) == sorted(set(HUB_PRESETS.values()))


def test_front_matter_python_and_gradio_are_what_ci_runs():
    assert re.search(r'^python_version: "(\d+\.\d+)"$', FRONT, re.MULTILINE).group(1) == \
        f"{sys.version_info.major}.{sys.version_info.minor}"
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert re.search(r"^sdk_version: (\S+)$", FRONT, re.MULTILINE).group(1) == pinned == gradio.__version__


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(pip install .*)\n```", README)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_ci_builds_the_vllm_environment_as_the_readme_says():
    install = re.search(r"```bash\n(pip install torch==\S+ -r requirements-vllm.txt .*?) && python app.py", README).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci.replace("\n    ", "\n").splitlines()
    assert "python -m pytest -q tests/test_vllm_engine.py" in ci and "python -m pytest -q tests/test_vllm_engine.py" in README
