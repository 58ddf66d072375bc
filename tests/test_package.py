"""The package itself: ``import packnet`` loads no torch (the command answers --help at once and handles Ctrl-C from
its first instruction), and every public name resolves, to the same object as its module's."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import packnet

ROOT = Path(__file__).resolve().parent.parent


def test_import_and_help_load_no_torch():
    code = (
        "import sys, packnet, packnet.cli\n"
        "packnet.cli.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
        "packnet.PackNet\n"
        "assert 'torch' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr


def test_every_public_name_resolves_to_its_modules_object():
    import packnet.models
    import packnet.modules
    import packnet.pack
    import packnet.pruning
    import packnet.training

    for name in packnet.__all__:
        value = getattr(packnet, name)
        if isinstance(value, str):  # a constant (packnet.MIXED): found in one of the package's modules
            assert any(getattr(module, name, None) == value for module in list(sys.modules.values())
                       if getattr(module, "__name__", "").startswith("packnet.")), name  # fmt: skip
            continue
        home = sys.modules[value.__module__]
        assert getattr(home, name) is value, name
    assert set(packnet.__all__) <= set(dir(packnet))


def test_static_imports_list_the_public_names():
    """The eager imports under TYPE_CHECKING (what type checkers and IDEs read) name exactly ``__all__``."""
    tree = ast.parse((ROOT / "packnet" / "__init__.py").read_text(encoding="utf-8"))
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    names = {alias.asname or alias.name for node in guarded.body for alias in node.names}
    assert names == set(packnet.__all__)


def test_an_unknown_name_is_an_attribute_error():
    try:
        packnet.no_such_name  # noqa: B018
    except AttributeError as error:
        assert str(error) == "module 'packnet' has no attribute 'no_such_name'"
    else:
        raise AssertionError("packnet.no_such_name resolved")
