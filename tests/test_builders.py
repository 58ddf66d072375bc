"""User architectures: packnet.register_builder, the module-tree fingerprint, and what loading never does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.models import BUILDERS


class TinyNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, width), nn.LayerNorm(width), nn.ReLU())
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_net(width: int = 6) -> nn.Module:
    model = TinyNet(width)
    model.packnet_input_shape = (5,)
    return model


@pytest.fixture
def registered():
    build = packnet.register_builder("tiny_net", tiny_net)
    yield build
    BUILDERS.pop("tiny_net", None)


def _trained_pack(build, tmp_path):
    torch.manual_seed(0)
    trainer = packnet.PackNet(build(width=7), head="head")
    data = [(torch.randn(8, 5), torch.randint(0, 2, (8,)))]
    for _ in range(2):
        trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.1), 1, show_progress=False)
    path = tmp_path / "tiny.pack"
    meta = packnet.save_pack(packnet.compile_pack(trainer), path)
    return trainer, path, meta


def test_a_registered_builder_loads_without_a_skeleton(registered, tmp_path):
    trainer, path, meta = _trained_pack(registered, tmp_path)
    assert meta["arch"] == {"builder": "tiny_net", "kwargs": {"width": 7}}
    assert meta["fingerprint"] == packnet.module_fingerprint(tiny_net(width=7))
    assert ["body.1", "LayerNorm", [["weight", [7]], ["bias", [7]]]] in meta["fingerprint"]
    loaded = packnet.load_pack(path)
    x = torch.randn(3, 5)
    for task in (1, 2):
        with packnet.set_task(loaded, task):
            assert torch.equal(loaded(x), trainer.predict(x, task))


def test_a_builder_that_changed_since_the_pack_is_refused_by_module_name(registered, tmp_path):
    _, path, _ = _trained_pack(registered, tmp_path)
    packnet.register_builder("tiny_net", lambda width=6: nn.Sequential(nn.Linear(5, width), nn.Linear(width, 2)))
    with pytest.raises(
        packnet.PackFormatError, match=r"not the pack's architecture: module <root> is a TinyNet in the pack but a"
    ):
        packnet.load_pack(path)


def test_an_unknown_builder_is_a_clear_error_and_nothing_is_imported(registered, tmp_path):
    _, path, _ = _trained_pack(registered, tmp_path)
    BUILDERS.pop("tiny_net")
    with pytest.raises(
        packnet.PackFormatError,
        match=r"model builder 'tiny_net', which is not registered in this process .*"
        r"call packnet.register_builder\('tiny_net', fn\) before loading",
    ):
        packnet.load_pack(path)


@pytest.mark.parametrize("name", ["this", "antigravity", "os.system", "builtins.eval", "packnet.models.mlp"])
def test_a_builder_named_after_code_is_never_imported_or_run(tmp_path, name):
    """The name a pack gives is a registry key: a module or function of that name is never imported or called."""
    pack = packnet.read_pack(Path(__file__).parent / "data" / "golden_v1.pack")
    pack.arch = {"builder": name, "kwargs": {}}
    path = tmp_path / "named.pack"
    packnet.save_pack(pack, path)
    before = set(sys.modules)
    if name in ("this", "antigravity"):  # modules with side effects on import, never imported by the test run
        assert name not in before
    with pytest.raises(packnet.PackFormatError, match=f"model builder '{name}', which is not registered"):
        packnet.load_pack(path)
    assert set(sys.modules) == before


def test_register_builder_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"register_builder: name must be a non-empty str, got ''"):
        packnet.register_builder("", tiny_net)
    with pytest.raises(TypeError, match=r"the builder for 'x' must be callable, got 3"):
        packnet.register_builder("x", 3)
    assert "x" not in BUILDERS
    build = packnet.register_builder("not_a_module", lambda: "text")
    try:
        with pytest.raises(TypeError, match=r"builder 'not_a_module' returned a str, not an nn.Module"):
            build()
    finally:
        BUILDERS.pop("not_a_module")


def test_register_builder_as_a_decorator():
    try:

        @packnet.register_builder("decorated")
        def decorated(width: int = 3) -> nn.Module:
            return nn.Linear(width, 2)

        assert decorated(width=4).packnet_arch == {"builder": "decorated", "kwargs": {"width": 4}}
        assert packnet.build_model({"builder": "decorated", "kwargs": {}}).in_features == 3
    finally:
        BUILDERS.pop("decorated", None)
