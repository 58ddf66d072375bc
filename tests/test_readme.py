"""README.md's first Python example runs as written (on this machine's device), so the README stays true."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_example() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "README.md has no ```python example"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = first_python_example()
    assert "task_loaders = " in code and "model.pack" in code
    monkeypatch.chdir(tmp_path)  # the example writes model.pack into the working directory
    namespace: dict = {"__name__": "__readme__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    assert (tmp_path / "model.pack").is_file()
    tasks, logits = namespace["tasks"], namespace["logits"]
    assert logits.shape == (len(tasks[1].test_y), 2)
    accuracy = float(re.search(r"task 2 accuracy: ([0-9.]+)", stdout.getvalue()).group(1))
    assert accuracy >= 0.9
