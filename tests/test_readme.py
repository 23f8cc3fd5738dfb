"""The README's promises: its curl examples work as written against `make run`'s setup."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import ROOT, Gunicorn

README = (ROOT / "README.md").read_text()


def readme_curls() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """gunicorn with conf/gunicorn.conf.py and the default conf/registry.yaml, as `make run` starts it."""
    with Gunicorn(ROOT / "conf/registry.yaml", log_dir=tmp_path_factory.mktemp("readme")).serving() as instance:
        yield instance


def test_readme_shows_the_two_commands_and_ci_runs_make_test() -> None:
    assert "make run" in README and "make test" in README
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_readme_has_curl_examples() -> None:
    assert len(readme_curls()) >= 4


@pytest.mark.parametrize("command", readme_curls())
def test_readme_curl_example_works_as_written(default_gateway: Gunicorn, command: str) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test; `make install` installs it"
    argv = shlex.split(command.replace("localhost:8000", f"127.0.0.1:{default_gateway.port}"))
    done = subprocess.run([curl, *argv[1:], "--fail-with-body", "--max-time", "30"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    if command.endswith("/metrics"):
        assert "# TYPE mcp_gateway_requests_total counter" in done.stdout
        return
    answer = json.loads(done.stdout)
    assert "error" not in answer, answer
    if '"name":"say_hello"' in command:
        assert answer["result"]["content"][0]["text"] == "Hello, Ada! Greetings from Gateway."
    elif '"method":"tools/call"' in command:
        assert answer["result"]["structuredContent"]["datetime"]
    if '"method":"tools/list"' in command and "/time/" in command:
        assert {t["name"] for t in answer["result"]["tools"]} == {"get_current_time", "convert_time"}


def test_example_paths_in_readme_exist() -> None:
    for path in ("conf/example-registry.json", "gateway/schema/registry.schema.json", "conf/gunicorn.conf.py"):
        assert Path(ROOT / path).exists(), path


def section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else len(README)]


def test_the_layout_names_every_module_once() -> None:
    layout = section("Layout")
    names = {name for name in re.findall(r"`([\w/]+\.py)`", layout) if not name.startswith("tests/")}
    package = ROOT / "gateway"
    modules = {str(path.relative_to(package)) for path in package.rglob("*.py")} - {"__init__.py"}
    assert modules - names == set(), "modules missing from the README's Layout"
    assert names - modules == set(), "the README's Layout names modules that do not exist"


def test_life_of_a_request_names_only_modules_that_exist() -> None:
    named = set(re.findall(r"`([\w/]+\.py)`", section("Life of a request")))
    assert len(named) >= 15
    assert {name for name in named if not (ROOT / "gateway" / name).exists()} == set()
