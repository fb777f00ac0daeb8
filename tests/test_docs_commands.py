"""The commands the documentation shows work: their config files exist, the cheap ones run.

Every ``python -m nbjax...`` and ``launch/...`` command is taken from README.md, docs/*.md,
launch/README.md (code blocks, indented blocks, inline code; ``\\`` continuations joined)
and the examples of the launch scripts' ``--help``. Each config path they name must exist;
the ones that cost seconds run: ``--help``, the launch scripts' ``--dry-run``, and runs of
configs/smoke.py (in a temporary work directory).
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import run_nbjax

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(python -m nbjax[\w.]*|launch/(?:tpu|gpu)\.sh)\b.*")


def _joined_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined into one."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _commands(candidates: list[str]) -> list[str]:
    """Every command in ``candidates``: from ``python -m nbjax`` or ``launch/`` to the end."""
    found = []
    for candidate in candidates:
        match = COMMAND.search(candidate)
        if match:
            found.append(match.group(0).split("  #")[0].strip().rstrip("'`"))
    return found


def _markdown_commands(text: str) -> list[str]:
    """The commands of fenced and indented code blocks and of inline code (which may run
    over a line break)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in _joined_lines(block)]
    lines += [line for line in _joined_lines(prose) if line.startswith("    ") and "`" not in line]
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return _commands(lines + spans)


def _help_commands(script: str) -> list[str]:
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), "--help"],
                          capture_output=True, text=True, timeout=30)
    example = proc.stdout.split("Example:", 1)[1]  # the help shows the script's bare name
    return _commands(_joined_lines(example.replace(script, "launch/" + script)))


def all_commands() -> list[tuple[str, str]]:
    """(where, command) for every documented command."""
    pairs = [(str(path.relative_to(ROOT)), command) for path in DOCS
             for command in _markdown_commands(path.read_text())]
    pairs += [(f"launch/{s} --help", c) for s in ("tpu.sh", "gpu.sh") for c in _help_commands(s)]
    return pairs


def _config_paths(command: str) -> list[str]:
    paths = re.findall(r"--config[= ]+[\"']?([\w./-]+\.py)", command)
    return [p for p in paths if not re.search(r"[A-Z]{3,}", p)]  # FILE and friends: a placeholder


def test_commands_are_found_in_every_kind_of_source():
    wheres = {where for where, _ in all_commands()}
    assert {"README.md", "docs/scaling.md", "launch/README.md", "launch/tpu.sh --help",
            "launch/gpu.sh --help"} <= wheres
    assert any("configs/mnist_vit4.py" in c for w, c in all_commands() if w == "README.md")


def test_every_config_file_a_command_names_exists():
    missing = [(where, path) for where, command in all_commands()
               for path in _config_paths(command) if not (ROOT / path).is_file()]
    assert not missing


def _words(command: str) -> list[str] | None:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an example cut inside quotes; its config path is still checked
        return None


def _cheap() -> list[tuple[str, list[str]]]:
    runs = []
    for where, command in all_commands():
        words = _words(command)
        if not words:
            continue
        smoke = "configs/smoke.py" in words and "--coordinator_address" not in words
        if "--help" in words or (words[0].startswith("launch/") and "--dry-run" in words) \
                or (words[:3] == ["python", "-m", "nbjax.main"] and smoke):
            runs.append((where, words))
    return runs


@pytest.mark.parametrize("where, words", _cheap(), ids=lambda x: x if isinstance(x, str) else
                         " ".join(x)[:60])
def test_cheap_documented_commands_run(where, words, tmp_path):
    if words[0].startswith("launch/"):
        proc = subprocess.run(["bash", str(ROOT / words[0]), *words[1:]], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    else:
        if "--workdir" in words:
            words[words.index("--workdir") + 1] = str(tmp_path / "run")
        proc = run_nbjax(*words[3:], config=None, timeout=600)
    assert proc.returncode == 0, (where, proc.stderr[-3000:])


def test_the_cheap_set_covers_help_dry_run_and_a_smoke_run():
    kinds = {("help" if "--help" in w else "dry-run" if "--dry-run" in w else "smoke")
             for _, w in _cheap()}
    assert kinds == {"help", "dry-run", "smoke"}
