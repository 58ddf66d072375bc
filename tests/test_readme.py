"""README.md stays true: its first Python example runs as written (on this machine's device), including the export
of a task into the plain model, and every file it links to exists."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def first_python_example() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "README.md has no ```python example"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = first_python_example()
    assert "task_loaders = " in code and "model.pack" in code
    monkeypatch.chdir(tmp_path)  # the example writes model.pack and task2.safetensors into the working directory
    namespace: dict = {"__name__": "__readme__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    assert (tmp_path / "model.pack").is_file() and (tmp_path / "task2.safetensors").is_file()
    tasks, logits = namespace["tasks"], namespace["logits"]
    assert logits.shape == (len(tasks[1].test_y), 2)
    packed = float(re.search(r"^task 2 accuracy: ([0-9.]+)$", stdout.getvalue(), re.MULTILINE).group(1))
    plain = float(re.search(r"^task 2, plain model: ([0-9.]+)$", stdout.getvalue(), re.MULTILINE).group(1))
    assert packed >= 0.9 and plain >= 0.9
    # The plain model holds exactly task 2's weights: those of tasks 1..2, nothing of later tasks.
    trainer, model = namespace["trainer"], namespace["plain"]
    for name, ids in trainer.task_ids.items():
        weight = model.get_submodule(name).weight
        assert bool((weight[(ids == 0) | (ids > 2)] == 0).all()), name


def test_readme_names_both_commands_and_where_we_stand():
    text = README.read_text(encoding="utf-8")
    first_screen = text[: text.index("## Read on")]
    assert "make demo" in first_screen and "make test" in first_screen
    header = next(line for line in first_screen.splitlines() if line.startswith("| capability |"))
    assert header == "| capability | on the CPU | on an NVIDIA H200 | not yet |"
    assert "2026-11-27" in first_screen
    # The version README says the code is: the newest row of the kernel versions' table in benchmarks/NOTES.md.
    versions = re.findall(r"^\| (v\d+) \|", (ROOT / "benchmarks" / "NOTES.md").read_text(encoding="utf-8"), re.M)
    assert f"The code is kernel {versions[-1]}," in first_screen, versions[-1]


def test_every_file_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text(encoding="utf-8"))
    assert links
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert missing == []
