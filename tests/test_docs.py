"""The README and docs/ cannot drift from the code: every shell block in them either runs
here, against a lab started as the README starts one (``dynvm lab``), or says why it
cannot (``sh not-run: <why>``), and then the ``dynvm`` commands and ``make`` targets it
names must exist. The Jenkins pipeline and the GitHub Actions job run too: their shell
steps, in their order, the release last whatever happened before it.

A block runs with ``bash -euo pipefail`` in a folder of its own, with ``.venv/bin`` first on
``PATH``; the addresses the docs use for the service (``127.0.0.1:5000``,
``dynvm.example.com:5000``) are the test lab's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from bench.processes import free_port, wait_healthy

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```([A-Za-z]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SERVICE_ADDRESSES = ("127.0.0.1:5000", "dynvm.example.com:5000")
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(page, line, match.group(1), match.group(2).strip(), match.group(3)))
    return found


def runnable(language: str | set[str]) -> list[Block]:
    languages = {language} if isinstance(language, str) else language
    return [b for b in blocks() if b.language in languages and b.info == "runnable"]


@dataclass
class Lab:
    url: str
    home: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """``dynvm lab``, as the README's quick start runs it (on a free port)."""
    directory = tmp_path_factory.mktemp("docs-lab")
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "dynvm"), "lab", "--hosts", "4", "--port", str(port), "--directory", str(directory / ".lab")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=directory,
    )
    url = f"http://127.0.0.1:{port}"
    (directory / ".venv").symlink_to(sys.prefix)  # the checkout's .venv, as the README has it
    _fake_test_suite(directory)
    try:
        wait_healthy(url, process, timeout=90)
        yield Lab(url, directory)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def run(script: str, lab: Lab, where: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    def ours(text: str) -> str:
        for address in SERVICE_ADDRESSES:
            text = text.replace(address, lab.url.removeprefix("http://"))
        return text

    script = ours(script)
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("DYNVM_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(lab.home),  # nothing the docs run writes to the real home
        **{key: ours(value) for key, value in (env or {}).items()},
    }
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (
        f"{where} failed ({done.returncode}):\n{script}\n--- out\n{done.stdout}\n--- err\n{done.stderr}"
    )


def test_every_shell_block_runs_here_or_says_why_not():
    unsaid = []
    for block in blocks():
        if block.language not in SHELLS:
            continue
        if block.info == "runnable":
            continue
        why = block.info.removeprefix("not-run:").strip()
        if not block.info.startswith("not-run:") or len(why.split()) < 3:
            unsaid.append(block.where)
    assert unsaid == [], f"shell blocks that neither run (sh runnable) nor say why (sh not-run: <why>): {unsaid}"
    assert runnable(SHELLS), "no runnable shell block found: the parser has drifted from the docs"


def test_the_commands_the_blocks_that_do_not_run_name_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    missing = []
    for block in blocks():
        if block.language not in SHELLS or block.info == "runnable":
            continue
        for line in block.text.splitlines():
            command = line.split("#", 1)[0].strip()
            for target in re.findall(r"\bmake ([a-z][a-z-]*)", command):
                if target not in targets:
                    missing.append(f"{block.where}: make {target}")
            for words in re.findall(r"(?:^|[;&|(]\s*|/bin/)dynvm ((?:[a-z][a-z-]* ?){1,2})", command):
                names = [w for w in words.split() if not w.startswith("-")]
                if not names:
                    continue
                helped = subprocess.run(
                    [str(BIN / "dynvm"), *names, "--help"], capture_output=True, text=True, timeout=60
                )
                if helped.returncode != 0:
                    helped = subprocess.run(
                        [str(BIN / "dynvm"), names[0], "--help"], capture_output=True, text=True, timeout=60
                    )
                if helped.returncode != 0:
                    missing.append(f"{block.where}: dynvm {' '.join(names)}")
    assert missing == []


@pytest.mark.parametrize("block", runnable(SHELLS), ids=lambda b: b.where)
def test_the_shell_block_runs_against_a_lab(block: Block, lab: Lab):
    run(block.text, lab, block.where, lab.home)


def _sh_steps(groovy: str) -> list[str]:
    """The scripts of the pipeline's sh steps (single- or triple-quoted), in their order;
    the examples use no backslash escapes."""
    steps = re.findall(r"^\s*sh (?:'''(.*?)'''|'([^'\n]*)')\s*$", groovy, re.M | re.S)
    return [triple or single for triple, single in steps]


def _fake_test_suite(into: Path) -> None:
    """The job's own tests, which the examples call ``./run-tests.sh ADDRESS...``: here they
    check that they were given addresses of the lab's VMs."""
    script = into / "run-tests.sh"
    script.write_text(
        '#!/bin/sh\n[ "$#" -gt 0 ] || exit 1\nfor ip in "$@"; do case $ip in 127.7*) ;; *) exit 1;; esac; done\n'
    )
    script.chmod(0o755)


@pytest.mark.parametrize("block", runnable("groovy"), ids=lambda b: b.where)
def test_the_jenkins_pipeline_runs_its_steps_and_always_releases(block: Block, lab: Lab, tmp_path: Path):
    environment = dict(re.findall(r"^\s*([A-Z_]+)\s*=\s*'([^']*)'", block.text, re.M))
    body, _, post = block.text.partition("post {")
    steps, always = _sh_steps(body), _sh_steps(post)
    assert steps, f"{block.where}: no sh step found"
    assert always, f"{block.where}: no sh step in post {{ always {{ ... }} }}"
    env = environment | {"BUILD_TAG": "jenkins-docs-pipeline-7"}
    _fake_test_suite(tmp_path)
    for step in steps + always:
        run(step, lab, block.where, tmp_path, env)
    assert_released(lab, "jenkins-docs-pipeline-7")


@pytest.mark.parametrize("block", runnable("yaml"), ids=lambda b: b.where)
def test_the_github_actions_job_runs_its_steps_and_always_releases(block: Block, lab: Lab, tmp_path: Path):
    workflow = yaml.safe_load(block.text)
    [job] = workflow["jobs"].values()
    values = {"github.run_id": "4242", "github.run_attempt": "1"}

    def expand(text: str) -> str:
        def value(match: re.Match[str]) -> str:
            assert match.group(1) in values, f"{block.where}: no value for ${{{{ {match.group(1)} }}}} here"
            return values[match.group(1)]

        return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", value, text)

    env = {key: expand(str(v)) for key, v in job.get("env", {}).items()}
    runs = [step for step in job["steps"] if "run" in step]
    assert any(step.get("if") == "always()" for step in runs), f"{block.where}: no release step with if: always()"
    _fake_test_suite(tmp_path)
    for step in runs:
        run(
            expand(step["run"]),
            lab,
            block.where,
            tmp_path,
            env | {k: expand(str(v)) for k, v in step.get("env", {}).items()},
        )
    assert_released(lab, env.get("NAME", ""))


def assert_released(lab: Lab, name: str) -> None:
    leases = httpx.get(f"{lab.url}/api/v1/leases", timeout=30).json()
    held = [lease["name"] for lease in leases if lease["name"].startswith(name)] if name else []
    assert held == [], f"the example left {held} leased"


def test_every_link_to_a_file_points_into_the_repository_and_exists():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (page.parent / target).resolve()
            if not path.is_relative_to(REPO) or not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_make_lab_serves_where_port_and_hosts_say():
    planned = subprocess.run(
        ["make", "-n", "lab", "PORT=5055", "HOSTS=2"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert planned.returncode == 0, planned.stderr
    [lab] = [line for line in planned.stdout.splitlines() if "dynvm lab" in line]
    assert "--port 5055" in lab
    assert "--hosts 2" in lab
