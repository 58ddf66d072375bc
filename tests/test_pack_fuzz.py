"""Pack files under damage: the v1 golden pack, one test per validation rule, and bounded fuzzing.

Every damaged file must either load correctly or raise ``packnet.PackFormatError`` with a message; any other
exception, a hang or a crash is a bug. The golden pack (tests/data/golden_v1.pack, written once by
tests/data/make_golden.py and never regenerated here) pins format version 1: its bytes, its metadata and its
outputs (exact in float32 by construction, so ``torch.equal`` holds on any CPU). The writer now writes format 2,
and every version-1 rule below still holds for version-1 files.

Fuzzing uses hypothesis with ``derandomize=True`` so CI sees the same few hundred cases every run; set
``PACKNET_FUZZ_SCALE=20`` to run twenty times as many random cases locally.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import random
import signal
import struct
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import packnet

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_v1.pack"
GOLDEN_SHA256 = "b12e0e2c327ff85524d1a31845603084ff3e89f3f42c5760f498806125d7091b"
GOLDEN_HEADER_LENGTH = 7896
NUM_TASKS = 3
# The packnet metadata of format version 1, spelled out: a change to the writer shows up here first.
GOLDEN_META = {
    "arch": {"builder": "small_cnn", "kwargs": {"image_size": 8, "in_channels": 1, "num_classes": 3, "width": 2}},
    "dtype": "float32",
    "format": "packnet-pack",
    "layers": [
        {"kind": "conv2d", "name": "features.0", "shape": [2, 1, 3, 3]},
        {"kind": "conv2d", "name": "features.3", "shape": [4, 2, 3, 3]},
        {"kind": "conv2d", "name": "features.6", "shape": [4, 4, 3, 3]},
        {"kind": "linear", "name": "features.10", "shape": [8, 16]},
    ],
    "num_tasks": 3,
    "producer": "packnet 0.1.0",
    "sha256": "21415eabc2086eb32737901cc113e00ff538ee8a09693dd9319c8d4c17cb1046",
    "task_keys": sorted(
        [f"features.{i}.{field}" for i in (1, 4, 7, 11) for field in ("weight", "bias", "running_mean", "running_var")]
        + [f"features.{i}.num_batches_tracked" for i in (1, 4, 7, 11)]
        + ["features.10.bias", "head.weight", "head.bias"]
    ),
    "version": 1,
}
SCALE = max(1, int(os.environ.get("PACKNET_FUZZ_SCALE", "1")))
_FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(examples: int):
    """Hypothesis settings of a fuzz test: ``examples`` cases in CI (times PACKNET_FUZZ_SCALE)."""
    return settings(_FUZZ_SETTINGS, max_examples=examples * SCALE)


LOAD_SECONDS = 20  # far above a normal load (milliseconds): past it, the load counts as hung


# ---------------------------------------------------------------------------------------------------- file helpers
def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header dict with ``__metadata__``, data section)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header, body: bytes) -> bytes:
    """Bytes of a safetensors file with ``header`` (any JSON value) and data section ``body``."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def meta_of(header: dict) -> dict:
    return json.loads(header["__metadata__"]["packnet"])


def with_meta(header: dict, meta) -> dict:
    header = copy.deepcopy(header)
    header["__metadata__"]["packnet"] = json.dumps(meta)
    return header


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The format's checksum, written out independently of packnet: SHA-256 over the tensors in name order, each
    as the JSON ``[name, "torch.<dtype>", shape]`` followed by its raw little-endian bytes."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


def golden_meta() -> dict:
    return meta_of(split(GOLDEN.read_bytes())[0])


def write_pack(path: Path, tensors: dict[str, torch.Tensor], meta: dict, *, fix_checksum: bool = True) -> Path:
    """Write ``tensors`` with packnet metadata ``meta``; by default with the checksum the tensors need."""
    meta = dict(meta)
    if fix_checksum:
        meta["sha256"] = checksum(tensors)
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()}, path, metadata={"packnet": json.dumps(meta)}
    )
    return path


class _Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` in the loader can swallow it."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Fail a call that runs longer than ``seconds`` (Unix main thread; elsewhere no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang(f"loading took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outputs(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    results = {}
    with torch.no_grad():
        for task in range(1, model_tasks(model) + 1):
            with packnet.set_task(model, task):
                results[task] = model(x)
    return results


def model_tasks(model) -> int:
    return packnet.task_modules(model)[0].num_tasks


def load_outcome(path: Path, expected: dict, what: str, same_outputs: bool = True):
    """Load ``path``: returns the PackFormatError, or None after checking the loaded model.

    With ``same_outputs`` (damage that cannot legitimately change the network) the model must give the golden
    outputs bit for bit; otherwise it must merely run for every task. Any other exception fails the test.
    """
    try:
        with watchdog(LOAD_SECONDS):
            model = packnet.load_pack(path, backend="reference")
    except packnet.PackFormatError as error:
        assert str(error).strip(), f"{what}: PackFormatError without a message"
        return error
    except _Hang:
        pytest.fail(f"{what}: load_pack hung (> {LOAD_SECONDS} s)")
    except Exception as error:  # noqa: BLE001 - the point: anything but PackFormatError is a bug
        pytest.fail(f"{what}: load_pack raised {type(error).__name__}, not PackFormatError: {error}")
    got = outputs(model, expected["input"])
    assert all(output.shape == (4, 3) for output in got.values()), what
    if same_outputs:
        assert model_tasks(model) == NUM_TASKS, what
        for task in range(1, NUM_TASKS + 1):
            assert torch.equal(got[task], expected[f"output/task{task}"]), f"{what}: loaded with other outputs"
    return None


def golden_expected() -> dict[str, torch.Tensor]:
    return load_file(DATA / "golden_v1_expected.safetensors")


@pytest.fixture(scope="module")
def expected():
    return golden_expected()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file path the fuzz cases overwrite (hypothesis reruns a test body many times per fixture)."""
    return tmp_path_factory.mktemp("fuzz") / "case.pack"


# ---------------------------------------------------------------------------------------------------- the golden pack
def test_golden_bytes_are_unchanged():
    data = GOLDEN.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256, "tests/data/golden_v1.pack was modified"
    assert data[:8] == struct.pack("<Q", GOLDEN_HEADER_LENGTH)
    header, _ = split(data)
    assert json.loads(header["__metadata__"]["packnet"]) == GOLDEN_META
    assert checksum(golden_tensors()) == GOLDEN_META["sha256"]


@pytest.mark.parametrize("fuse", [False, True])
def test_golden_pack_loads_with_the_same_outputs(expected, fuse):
    model = packnet.load_pack(GOLDEN, fuse=fuse, backend="reference")
    got = outputs(model, expected["input"])
    assert sorted(got) == [1, 2, 3]
    for task in range(1, NUM_TASKS + 1):
        assert torch.equal(got[task], expected[f"output/task{task}"]), task


def test_golden_pack_exports_the_same_outputs(expected):
    pack = packnet.read_pack(GOLDEN)
    assert pack.num_tasks == NUM_TASKS and pack.dtype == torch.float32
    assert pack.ownership()["features.10"] == [16, 64, 32, 16]  # 128 weights, nested halves
    plain = packnet.small_cnn(**GOLDEN_META["arch"]["kwargs"]).eval()
    for task in range(1, NUM_TASKS + 1):
        plain.load_state_dict(packnet.export_task_state_dict(pack, task))
        with torch.no_grad():
            assert torch.equal(plain(expected["input"]), expected[f"output/task{task}"]), task


def test_writer_rewrites_a_v1_pack_as_v2_with_the_same_tensors(tmp_path, expected):
    """Format 2 adds shared_keys, fingerprint and input_shape to the metadata and nothing else: a v1 pack read and
    written again holds the same tensors under the same names, and loads with the golden outputs."""
    again = tmp_path / "again.pack"
    packnet.save_pack(packnet.read_pack(GOLDEN), again)
    header, _ = split(again.read_bytes())
    golden_header, _ = split(GOLDEN.read_bytes())
    meta = meta_of(header)
    assert {k: v for k, v in meta.items() if k != "producer"} == {
        **{k: v for k, v in GOLDEN_META.items() if k != "producer"},
        "version": 2,
        "shared_keys": [],
        "fingerprint": None,
        "input_shape": None,
    }
    layout = {name: (entry["dtype"], entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    golden_layout = {name: (e["dtype"], e["shape"]) for name, e in golden_header.items() if name != "__metadata__"}
    assert layout == golden_layout
    saved, golden = load_file(again), golden_tensors()
    assert all(torch.equal(saved[name], golden[name]) for name in golden)
    model = packnet.load_pack(again, backend="reference")
    for task, output in outputs(model, expected["input"]).items():
        assert torch.equal(output, expected[f"output/task{task}"]), task


# ---------------------------------------------------------------------------------------------------- format 2
GOLDEN_V2 = DATA / "golden_v2.pack"
GOLDEN_V2_SHA256 = "803eff099cd61ae3069e2baf76113e6a8372511cd1c0a2437c5cf44785fcb0c6"


def test_golden_v2_bytes_and_metadata_are_unchanged():
    data = GOLDEN_V2.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_V2_SHA256, "tests/data/golden_v2.pack was modified"
    meta = meta_of(split(data)[0])
    assert meta["version"] == 2 and meta["input_shape"] == [1, 8, 8]
    assert meta["shared_keys"] == [
        f"features.4.{field}" for field in ("bias", "num_batches_tracked", "running_mean", "running_var", "weight")
    ]
    assert not any(key.startswith("features.4.") for key in meta["task_keys"])
    assert meta["fingerprint"] == packnet.module_fingerprint(packnet.small_cnn(**GOLDEN_META["arch"]["kwargs"]))
    assert checksum(load_file(GOLDEN_V2)) == meta["sha256"]


@pytest.mark.parametrize("fuse", [False, True])
def test_golden_v2_pack_loads_with_the_same_outputs(fuse):
    expected = load_file(DATA / "golden_v2_expected.safetensors")
    model = packnet.load_pack(GOLDEN_V2, fuse=fuse, backend="reference")
    assert model.packnet_folding["folded"] == (4 if fuse else 0)
    got = outputs(model, expected["input"])
    for task in range(1, NUM_TASKS + 1):
        assert torch.equal(got[task], expected[f"output/task{task}"]), task


def test_writer_writes_the_golden_v2_pack_byte_for_byte(tmp_path):
    again = tmp_path / "again.pack"
    packnet.save_pack(packnet.read_pack(GOLDEN_V2), again)
    assert again.read_bytes() == GOLDEN_V2.read_bytes()


@pytest.mark.interpreter
@pytest.mark.skipif(
    importlib.util.find_spec("packnet_kernels.linear") is None
    or importlib.util.find_spec("packnet_kernels.conv2d") is None,
    reason="the Triton kernels are not written yet",
)
def test_golden_pack_through_the_triton_kernels(expected, kernel_device):
    from conftest import TOLERANCES

    model = packnet.load_pack(GOLDEN, backend="triton").to(kernel_device)
    x = expected["input"].to(kernel_device)
    for task, output in outputs(model, x).items():
        if kernel_device == "cpu":  # the values are exact in float32: any order of summation gives the same bits
            assert torch.equal(output, expected[f"output/task{task}"]), task
        else:  # TF32 tensor-core dots round the inputs
            atol, rtol = TOLERANCES[torch.float32]
            torch.testing.assert_close(output.cpu(), expected[f"output/task{task}"], atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- one rule each
def _drop(name):
    return lambda tensors, meta: tensors.pop(name)


def _set(name, fn):
    def mutate(tensors, meta):
        tensors[name] = fn(tensors[name].clone() if name in tensors else None)

    return mutate


def _meta(key, value):
    def mutate(tensors, meta):
        if value is _DELETE:
            del meta[key]
        else:
            meta[key] = value

    return mutate


_DELETE = object()


def _free_position(tensors, layer):
    ids = tensors[f"layers/{layer}/task_ids"]
    return tuple(int(i) for i in (ids == 0).nonzero()[0])


def _nonzero_free(value):
    def mutate(tensors, meta):
        weight = tensors["layers/features.3/weight"].clone()
        weight[_free_position(tensors, "features.3")] = value
        tensors["layers/features.3/weight"] = weight

    return mutate


def _id(value):
    def mutate(tensors, meta):
        ids = tensors["layers/features.10/task_ids"].clone()
        ids[0, 0] = value
        tensors["layers/features.10/task_ids"] = ids

    return mutate


def _all_tasks(key, fn):
    def mutate(tensors, meta):
        for task in range(1, NUM_TASKS + 1):
            tensors[f"tasks/{task}/{key}"] = fn(tensors[f"tasks/{task}/{key}"].clone())

    return mutate


def _layer_entry(index, entry):
    def mutate(tensors, meta):
        meta["layers"][index] = entry

    return mutate


def _arch(**kwargs):
    def mutate(tensors, meta):
        meta["arch"] = {"builder": meta["arch"]["builder"], "kwargs": {**meta["arch"]["kwargs"], **kwargs}}

    return mutate


RULES = {
    # tensor set
    "missing_task_tensor": (_drop("tasks/2/head.bias"), r"missing tensors: \['tasks/2/head\.bias'\]"),
    "missing_task_ids": (_drop("layers/features.6/task_ids"), r"missing tensors: \['layers/features\.6/task_ids'\]"),
    "missing_layer_weight": (_drop("layers/features.0/weight"), r"missing tensors: \['layers/features\.0/weight'\]"),
    "extra_tensor": (_set("junk", lambda _: torch.zeros(2)), r"unexpected tensors: \['junk'\]"),
    "extra_task": (
        _set("tasks/4/head.bias", lambda _: torch.zeros(3)),
        r"unexpected tensors: \['tasks/4/head\.bias'\]",
    ),
    # dtypes and shapes
    "weight_dtype": (
        _set("layers/features.0/weight", lambda t: t.half()),
        r"layer 'features\.0' weight is torch\.float16, the pack's dtype is torch\.float32",
    ),
    "task_ids_dtype": (
        _set("layers/features.10/task_ids", lambda t: t.long()),
        r"layer 'features\.10' task_ids are torch\.int64, expected torch\.uint8",
    ),
    "task_ids_int8": (
        _set("layers/features.0/task_ids", lambda t: t.to(torch.int8)),
        r"task_ids are torch\.int8, expected torch\.uint8",
    ),
    "weight_shape": (
        _set("layers/features.10/weight", lambda t: t.t().contiguous()),
        r"layer 'features\.10': weight \[16, 8\] and task_ids \[8, 16\] must both be the declared 2-D or 4-D shape",
    ),
    "declared_shape": (
        _layer_entry(3, {"kind": "linear", "name": "features.10", "shape": [16, 8]}),
        r"layer 'features\.10': weight \[8, 16\] .* declared 2-D or 4-D shape \[16, 8\]",
    ),
    "layer_rank": (
        _set("layers/features.10/weight", lambda t: t.reshape(-1)),
        r"layer 'features\.10': weight \[128\]",
    ),
    "task_state_shape": (
        _set("tasks/2/head.bias", lambda t: torch.zeros(4)),
        r"task 2's 'head\.bias' differs in shape or dtype from task 1's",
    ),
    "task_state_dtype": (
        _set("tasks/3/features.1.running_var", lambda t: t.double()),
        r"task 3's 'features\.1\.running_var' differs in shape or dtype from task 1's",
    ),
    "all_tasks_other_shape": (
        _all_tasks("head.bias", lambda t: torch.zeros(5)),
        r"task 1's 'head\.bias' has shape \(5,\) but the model's is \(3,\): the pack is for another architecture",
    ),
    # ids and free weights
    "id_above_task_count": (_id(4), r"layer 'features\.10' has task id 4 but the pack holds 3 tasks"),
    "id_255": (_id(255), r"has task id 255 but the pack holds 3 tasks"),
    "free_weight_nonzero": (_nonzero_free(0.5), r"layer 'features\.3' has non-zero values in free weights"),
    "free_weight_nan": (_nonzero_free(float("nan")), r"layer 'features\.3' has non-zero values in free weights"),
    "free_weight_inf": (_nonzero_free(float("-inf")), r"non-zero values in free weights"),
    # metadata
    "version_3": (_meta("version", 3), r"unsupported format version 3; this packnet reads 1, 2"),
    "version_2_without_its_fields": (_meta("version", 2), r"shared_keys must be a list of strings"),
    "version_string": (_meta("version", "1"), r"unsupported format version '1'"),
    "version_missing": (_meta("version", _DELETE), r"unsupported format version None"),
    "format_name": (_meta("format", "other-pack"), r"format is 'other-pack', expected 'packnet-pack'"),
    "num_tasks_zero": (_meta("num_tasks", 0), r"num_tasks must be an int in 1\.\.255, got 0"),
    "num_tasks_256": (_meta("num_tasks", 256), r"num_tasks must be an int in 1\.\.255, got 256"),
    "num_tasks_float": (_meta("num_tasks", 3.0), r"num_tasks must be an int in 1\.\.255, got 3\.0"),
    "num_tasks_fewer": (_meta("num_tasks", 2), r"unexpected tensors: \['tasks/3/"),
    "num_tasks_more": (_meta("num_tasks", 4), r"missing tensors: \['tasks/4/"),
    "dtype_name": (
        _meta("dtype", "float64"),
        r"dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'float64'",
    ),
    "no_layers": (_meta("layers", []), r"the metadata lists no layers"),
    "layer_entry": (_layer_entry(0, ["features.0"]), r"malformed layer entry \['features\.0'\]"),
    "task_keys": (_meta("task_keys", "head.bias"), r"task_keys must be a list of strings"),
    "arch_shape": (_meta("arch", "small_cnn"), r"arch must be null or \{'builder': str, 'kwargs': \{\.\.\.\}\}"),
    "arch_unknown_builder": (
        _meta("arch", {"builder": "resnet", "kwargs": {}}),
        r"model builder 'resnet', which is not registered in this process",
    ),
    "arch_bad_kwargs": (_arch(depth=3), r"cannot rebuild the architecture .*unexpected keyword argument 'depth'"),
    "arch_other_width": (_arch(width=3), r"'features\.0' has weight shape \(2, 1, 3, 3\) but the model's is \(3, 1"),
    "arch_null": (_meta("arch", None), r"records no architecture spec; pass the model skeleton"),
    "layer_not_in_model": (
        _layer_entry(0, {"kind": "conv2d", "name": "features.99", "shape": [2, 1, 3, 3]}),
        r"missing tensors: \['layers/features\.99/task_ids', 'layers/features\.99/weight'\]",
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_is_reached_and_named(tmp_path, rule):
    """Each damage, with the checksum recomputed so that the later checks are really reached."""
    mutate, message = RULES[rule]
    tensors, meta = golden_tensors(), golden_meta()
    mutate(tensors, meta)
    path = write_pack(tmp_path / "damaged.pack", tensors, meta)
    with pytest.raises(packnet.PackFormatError, match=message):
        packnet.load_pack(path, backend="reference")


def _share(key):
    """Move task 1's ``key`` to the shared state and drop it from every task."""

    def mutate(tensors, meta):
        tensors[f"shared/{key}"] = tensors[f"tasks/1/{key}"]
        for task in range(1, NUM_TASKS + 1):
            del tensors[f"tasks/{task}/{key}"]
        meta["task_keys"].remove(key)
        meta["shared_keys"] = sorted([*meta["shared_keys"], key])

    return mutate


def _also_per_task(key):
    """Store shared ``key`` per task as well."""

    def mutate(tensors, meta):
        for task in range(1, NUM_TASKS + 1):
            tensors[f"tasks/{task}/{key}"] = tensors[f"shared/{key}"].clone()
        meta["task_keys"] = sorted([*meta["task_keys"], key])

    return mutate


def _fingerprint_entry(index, entry):
    def mutate(tensors, meta):
        meta["fingerprint"][index] = entry

    return mutate


def golden_meta_v2() -> dict:
    return meta_of(split((DATA / "golden_v2.pack").read_bytes())[0])


# Rules that only format 2 has, applied to the v2 golden pack.
RULES_V2 = {
    "shared_keys_type": (_meta("shared_keys", "features.4.bias"), r"shared_keys must be a list of strings"),
    "shared_tensor_missing": (_drop("shared/features.4.bias"), r"missing tensors: \['shared/features\.4\.bias'\]"),
    "shared_and_per_task": (
        _also_per_task("features.4.bias"),
        r"keys both shared and per task: \['features\.4\.bias'\]",
    ),
    "shared_layer_bias": (_share("features.10.bias"), r"pack layer 'features\.10' has a shared bias"),
    "fingerprint_type": (_meta("fingerprint", {"features.0": "Conv2d"}), r"fingerprint must be null or a list of"),
    "fingerprint_entry": (_fingerprint_entry(1, ["features", "Sequential"]), r"fingerprint must be null or a list"),
    "fingerprint_negative_dim": (
        _fingerprint_entry(2, ["features.0", "Conv2d", [["weight", [-2, 1, 3, 3]]]]),
        r"fingerprint must be null or a list",
    ),
    "fingerprint_other_class": (
        _fingerprint_entry(2, ["features.0", "Conv3d", [["weight", [2, 1, 3, 3]]]]),
        r"not the pack's architecture: module 'features\.0' is a Conv3d in the pack but a Conv2d in the model",
    ),
    "fingerprint_extra_module": (
        lambda tensors, meta: meta["fingerprint"].append(["features.99", "Dropout", []]),
        r"the pack's module 'features\.99' \(Dropout\) is missing from the model",
    ),
    "fingerprint_missing_module": (
        lambda tensors, meta: meta["fingerprint"].pop(),
        r"the model's module 'head' \(Linear\) is not in the pack",
    ),
    "input_shape_type": (_meta("input_shape", "1x8x8"), r"input_shape must be null or a list of positive ints"),
    "input_shape_zero": (_meta("input_shape", [1, 0, 8]), r"input_shape must be null or a list of positive ints"),
    "input_shape_huge": (_meta("input_shape", [4096, 4096, 4096]), r"at most 67108864 values"),
}


@pytest.mark.parametrize("rule", sorted(RULES_V2))
def test_each_format_2_rule_is_reached_and_named(tmp_path, rule):
    mutate, message = RULES_V2[rule]
    tensors, meta = load_file(DATA / "golden_v2.pack"), golden_meta_v2()
    mutate(tensors, meta)
    path = write_pack(tmp_path / "damaged.pack", tensors, meta)
    with pytest.raises(packnet.PackFormatError, match=message):
        packnet.load_pack(path, backend="reference")


def test_a_module_with_shared_and_per_task_state_keeps_both(tmp_path):
    """A BatchNorm whose bias is shared and whose other state is per task (refused before: "a module's state must be
    all per task or all shared") loads: the shared bias stays in the module, the rest is read per task. Task 1,
    whose bias the shared one is, gives the golden outputs bit for bit; the others run."""
    tensors, meta = load_file(DATA / "golden_v2.pack"), golden_meta_v2()
    _share("features.1.bias")(tensors, meta)
    model = packnet.load_pack(write_pack(tmp_path / "mixed.pack", tensors, meta), fuse=False, backend="reference")
    golden = packnet.load_pack(DATA / "golden_v2.pack", fuse=False, backend="reference")
    x = load_file(DATA / "golden_v2_expected.safetensors")["input"]
    got, want = outputs(model, x), outputs(golden, x)
    assert torch.equal(got[1], want[1])
    assert not torch.equal(got[2], want[2])  # task 2's own bias is gone: task 1's is shared
    assert isinstance(model.features[1].packnet_task_state, packnet.TaskParameters)
    assert torch.equal(model.features[1].bias, golden.features[1].per_task[0].bias)


def test_layer_renamed_to_a_module_that_is_not_prunable(tmp_path):
    tensors, meta = golden_tensors(), golden_meta()
    tensors["layers/features.1/weight"] = torch.zeros(2, 2)
    tensors["layers/features.1/task_ids"] = torch.zeros(2, 2, dtype=torch.uint8)
    meta["layers"].append({"kind": "linear", "name": "features.1", "shape": [2, 2]})
    with pytest.raises(packnet.PackFormatError, match=r"pack layer 'features\.1' is a BatchNorm2d in the model"):
        packnet.load_pack(write_pack(tmp_path / "p.pack", tensors, meta), backend="reference")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set("layers/features.0/weight", lambda t: t * 2), id="weight_changed"),
        pytest.param(_id(0), id="task_id_changed"),
        pytest.param(_set("tasks/1/head.bias", lambda t: t + 1), id="task_state_changed"),
        pytest.param(_drop("tasks/1/head.bias"), id="tensor_removed"),
    ],
)
def test_checksum_catches_changed_tensors(tmp_path, mutate):
    tensors, meta = golden_tensors(), golden_meta()
    mutate(tensors, meta)
    path = write_pack(tmp_path / "p.pack", tensors, meta, fix_checksum=False)
    with pytest.raises(packnet.PackFormatError, match="checksum mismatch: the tensors are not the ones"):
        packnet.load_pack(path)


def test_checksum_field_damaged(tmp_path):
    meta = golden_meta()
    meta["sha256"] = meta["sha256"][:-1] + "0"
    path = write_pack(tmp_path / "p.pack", golden_tensors(), meta, fix_checksum=False)
    with pytest.raises(packnet.PackFormatError, match="checksum mismatch"):
        packnet.load_pack(path)


def _header_case(fn):
    def make():
        header, body = split(GOLDEN.read_bytes())
        return fn(header, body)

    return make


def _entry(name, **changes):
    def fn(header, body):
        header[name] = {**header[name], **changes}
        return join(header, body)

    return _header_case(fn)


def _first_two_overlap(header, body):
    first, second = "layers/features.0/weight", "layers/features.0/task_ids"
    begin = header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [
        begin,
        begin + (header[second]["data_offsets"][1] - header[second]["data_offsets"][0]),
    ]
    return join(header, body)


CONTAINER = {
    "empty_file": (lambda: b"", r"file too short \(0 bytes\)"),
    "seven_bytes": (lambda: GOLDEN.read_bytes()[:7], r"file too short \(7 bytes\)"),
    # Files of another kind named .pack: said to be no pack at all, not a damaged one.
    "text_file": (
        lambda: b"hello world, this is text\n",
        r"not a pack \(nor any safetensors file\): it starts with b'hello",
    ),
    "png_file": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, r"not a pack \(nor any safetensors file\)"),
    "header_longer_than_file": (lambda: struct.pack("<Q", 10**6) + b"{}", r"header length 1000000 exceeds the file"),
    "header_length_huge": (lambda: b"\xff" * 8 + b"{}", r"header length 18446744073709551615 exceeds the file"),
    "header_not_json": (lambda: struct.pack("<Q", 8) + b"{not js}", r"the safetensors header is not valid JSON"),
    "header_not_utf8": (lambda: struct.pack("<Q", 2) + b"\xff\xfe", r"the safetensors header is not valid JSON"),
    "header_nesting_bomb": (
        lambda: struct.pack("<Q", 200000) + b"[" * 200000,
        r"the safetensors header is not valid JSON",
    ),
    "header_is_a_list": (lambda: join([1, 2], b""), r"the safetensors header is not a JSON object"),
    "metadata_not_strings": (
        lambda: join({"__metadata__": {"packnet": {"format": "packnet-pack"}}}, b""),
        r"the safetensors metadata must map strings to strings",
    ),
    "no_packnet_metadata": (lambda: join({"__metadata__": {"other": "x"}}, b""), r"not a packnet pack"),
    "packnet_metadata_not_json": (
        lambda: join({"__metadata__": {"packnet": "{oops"}}, b""),
        r"the packnet metadata is not valid JSON",
    ),
    "packnet_metadata_a_list": (lambda: join({"__metadata__": {"packnet": "[1]"}}, b""), r"format is \[1\]"),
    "entry_missing_offsets": (
        _header_case(lambda h, b: join({**h, "layers/features.0/weight": {"dtype": "F32", "shape": [2, 1, 3, 3]}}, b)),
        r"tensor 'layers/features\.0/weight' has a malformed header entry",
    ),
    "entry_extra_field": (_entry("tasks/1/head.bias", extra=1), r"tensor 'tasks/1/head\.bias' has a malformed header"),
    "entry_unknown_dtype": (_entry("tasks/1/head.bias", dtype="F8_E4M3"), r"has unsupported dtype 'F8_E4M3'"),
    "entry_dtype_not_string": (_entry("tasks/1/head.bias", dtype=7), r"has unsupported dtype 7"),
    "entry_negative_shape": (_entry("tasks/1/head.bias", shape=[-3]), r"has an invalid shape \[-3\]"),
    "entry_float_shape": (_entry("tasks/1/head.bias", shape=[3.0]), r"has an invalid shape \[3\.0\]"),
    "entry_huge_shape": (_entry("tasks/1/head.bias", shape=[2**39, 2**39]), r"needs \d+ bytes at offsets"),
    "entry_bool_shape": (_entry("tasks/1/head.bias", shape=[True]), r"has an invalid shape \[True\]"),
    "entry_offsets_too_short": (_entry("tasks/1/head.bias", data_offsets=[0]), r"has invalid data offsets \[0\]"),
    "entry_offsets_beyond_file": (
        _entry("tasks/3/head.weight", data_offsets=[10**9, 10**9 + 96]),
        r"tensor 'tasks/3/head\.weight' needs 96 bytes at offsets \[1000000000, 1000000096\] .* truncated or corrupt",
    ),
    "entry_offsets_reversed": (
        _entry("tasks/1/head.bias", data_offsets=[12, 0]),
        r"needs 12 bytes at offsets \[12, 0\]",
    ),
    "entry_shape_disagrees_with_offsets": (
        _entry("tasks/1/head.bias", shape=[4]),
        r"tensor 'tasks/1/head\.bias' needs 16 bytes at offsets \[\d+, \d+\]",
    ),
    "tensors_overlap": (_header_case(_first_two_overlap), r"overlap in the file"),
    "truncated_by_one_byte": (lambda: GOLDEN.read_bytes()[:-1], r"truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(CONTAINER))
def test_container_damage_is_named(tmp_path, case):
    make, message = CONTAINER[case]
    path = tmp_path / "damaged.pack"
    path.write_bytes(make())
    with pytest.raises(packnet.PackFormatError, match=message):
        packnet.load_pack(path)


def test_missing_file_is_named(tmp_path):
    """A missing file is not a damaged pack: the error a Python user expects for a path that is not there."""
    with pytest.raises(FileNotFoundError, match=r"no pack at .*nothing\.pack: no such file"):
        packnet.load_pack(tmp_path / "nothing.pack")


@pytest.mark.parametrize("kwargs", [{"width": -1}, {"num_classes": -1}, {"image_size": 10**9}], ids=str)
def test_arch_kwargs_cannot_escape_or_exhaust_memory(tmp_path, kwargs):
    tensors, meta = golden_tensors(), golden_meta()
    _arch(**kwargs)(tensors, meta)
    with pytest.raises(packnet.PackFormatError, match="architecture"):
        packnet.load_pack(write_pack(tmp_path / "p.pack", tensors, meta))


@pytest.mark.parametrize(
    ("key", "dtype"), [("head.weight", torch.float64), ("features.1.running_var", torch.bool)], ids=str
)
def test_per_task_state_in_another_dtype_is_rejected(tmp_path, key, dtype):
    tensors, meta = golden_tensors(), golden_meta()
    _all_tasks(key, lambda t: t.to(dtype))(tensors, meta)
    with pytest.raises(packnet.PackFormatError, match="dtype"):
        packnet.load_pack(write_pack(tmp_path / "p.pack", tensors, meta))


# ---------------------------------------------------------------------------------------------------- fuzzing
def test_every_truncation_fails_cleanly(scratch, expected):
    data = GOLDEN.read_bytes()
    body_start = 8 + GOLDEN_HEADER_LENGTH
    cuts = set(range(0, 17)) | {body_start - 1, body_start, body_start + 1, len(data) - 1}
    cuts |= set(random.Random(0).sample(range(len(data)), 100 * SCALE))
    for cut in sorted(cuts - {len(data)}):
        scratch.write_bytes(data[:cut])
        assert load_outcome(scratch, expected, f"truncated at {cut}") is not None, f"a pack cut at {cut} loaded"


@fuzz(150)
@given(
    flips=st.lists(st.tuples(st.integers(0, GOLDEN.stat().st_size - 1), st.integers(1, 255)), min_size=1, max_size=4),
    in_header=st.booleans(),
)
def test_flipped_bytes_load_correctly_or_fail_cleanly(scratch, expected, flips, in_header):
    data = bytearray(GOLDEN.read_bytes())
    header_end = 8 + GOLDEN_HEADER_LENGTH
    for position, xor in flips:
        position = position % header_end if in_header else position
        data[position] ^= xor
    scratch.write_bytes(bytes(data))
    load_outcome(scratch, expected, f"flips {flips} (in_header={in_header})")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["F32", "U8", "BF16", "I64", "float16", "packnet-pack", "layers/features.0/weight"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every path into a JSON document (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replace(document, path, value, delete: bool):
    if not path:
        return value
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


@fuzz(120)
@given(data=st.data())
def test_rewritten_metadata_loads_correctly_or_fails_cleanly(scratch, expected, data):
    """Random edits of the packnet metadata; the tensors (and so the checksum) stay valid."""
    header, body = split(GOLDEN.read_bytes())
    meta = meta_of(header)
    paths = list(_paths(meta))
    path = data.draw(st.sampled_from(paths), label="path")
    delete = bool(path) and data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(JSON_VALUES, label="value")
    meta = _replace(meta, path, value, delete)
    scratch.write_bytes(join(with_meta(header, meta), body))
    # Only the checksum covers the tensors; any metadata edit that passes validation describes the same network.
    load_outcome(scratch, expected, f"meta {'delete' if delete else 'set'} {path} = {value!r}")


@pytest.fixture(scope="module")
def expected_v2():
    return load_file(DATA / "golden_v2_expected.safetensors")


@fuzz(60)
@given(data=st.data())
def test_rewritten_v2_metadata_loads_correctly_or_fails_cleanly(scratch, expected_v2, data):
    """The same on the v2 golden pack, whose metadata adds shared keys, the fingerprint and the input shape."""
    header, body = split(GOLDEN_V2.read_bytes())
    meta = meta_of(header)
    path = data.draw(st.sampled_from(list(_paths(meta))), label="path")
    delete = bool(path) and data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(JSON_VALUES, label="value")
    meta = _replace(meta, path, value, delete)
    scratch.write_bytes(join(with_meta(header, meta), body))
    load_outcome(scratch, expected_v2, f"v2 meta {'delete' if delete else 'set'} {path} = {value!r}")


@fuzz(100)
@given(data=st.data())
def test_rewritten_header_entries_load_correctly_or_fail_cleanly(scratch, expected, data):
    """Random edits of the safetensors header: entries' dtype, shape, offsets, names; entries added or removed."""
    header, body = split(GOLDEN.read_bytes())
    names = sorted(name for name in header if name != "__metadata__")
    name = data.draw(st.sampled_from(names), label="tensor")
    action = data.draw(st.sampled_from(["field", "delete", "rename", "duplicate", "offset_shift"]), label="action")
    if action == "field":
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        header[name][field] = data.draw(
            JSON_VALUES | st.lists(st.integers(-2, 3 * len(body)), max_size=4), label="value"
        )
    elif action == "delete":
        del header[name]
    elif action == "rename":
        header[data.draw(st.text(max_size=30), label="new name")] = header.pop(name)
    elif action == "duplicate":
        header[data.draw(st.text(max_size=30), label="copy name")] = copy.deepcopy(header[name])
    else:
        shift = data.draw(st.integers(-64, 64).filter(bool), label="shift")
        header[name]["data_offsets"] = [offset + shift for offset in header[name]["data_offsets"]]
    scratch.write_bytes(join(header, body))
    load_outcome(scratch, expected, f"header {action} on {name!r}: {header.get(name)!r}")


SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, 1e30, -1e-30, float("nan"), float("inf"), float("-inf")])


@fuzz(80)
@given(data=st.data())
def test_rewritten_tensor_values_with_a_valid_checksum(scratch, expected, data):
    """Values changed and the checksum recomputed: ids, weights (free ones included), per-task state."""
    tensors, meta = golden_tensors(), golden_meta()
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    tensor = tensors[name].clone()
    index = data.draw(st.integers(0, tensor.numel() - 1), label="index")
    if tensor.dtype == torch.uint8:
        value = data.draw(st.integers(0, 255), label="value")
    elif tensor.dtype == torch.int64:
        value = data.draw(st.integers(-(2**63), 2**63 - 1), label="value")
    else:
        value = data.draw(SPECIAL_FLOATS | st.floats(-4, 4), label="value")
    tensor.view(-1)[index] = value
    tensors[name] = tensor
    write_pack(scratch, tensors, meta)
    error = load_outcome(scratch, expected, f"{name}.flat[{index}] = {value!r}", same_outputs=False)
    if name.endswith("/task_ids") and value > NUM_TASKS:
        assert error is not None and "but the pack holds 3 tasks" in str(error)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"shape": [8], "dtype": "complex64"}, r"input_spec dtype must be one of"),
        ({"shape": [2**27], "dtype": "int64"}, r"input_spec shape must be a list of positive ints"),
        ({"shape": [8], "dtype": "int64", "high": 0}, r"input_spec high must be an int in 1\.\.2\*\*62"),
        ({"shape": [8], "dtype": "int64", "extra": 1}, r"input_spec must be \{'shape'"),
        ({"keywords": {}}, r"input_spec keywords must map 1 to 64 input names"),
        ({"keywords": {"input_ids": {"shape": [-1], "dtype": "int64"}}}, r"keyword 'input_ids' shape must be"),
        ([8], r"input_spec must be \{'shape'"),
    ],
)
def test_a_crafted_input_spec_is_refused_by_name(tmp_path, spec, message):
    """The input spec sizes the probe save_pack draws: a crafted one must neither allocate without bound nor pass."""
    tensors, meta = load_file(DATA / "golden_v2.pack"), golden_meta_v2()
    meta["input_spec"] = spec
    with pytest.raises(packnet.PackFormatError, match=message):
        packnet.read_pack(write_pack(tmp_path / "spec.pack", tensors, meta))


def test_layer_kinds_are_checked_against_the_weight_and_the_model(tmp_path):
    tensors, meta = load_file(DATA / "golden_v2.pack"), golden_meta_v2()
    meta["layers"][0]["kind"] = "lstm"
    with pytest.raises(packnet.PackFormatError, match=r"layer 'features\.0' has unknown kind 'lstm'"):
        packnet.read_pack(write_pack(tmp_path / "kind.pack", tensors, meta))
    meta["layers"][0]["kind"] = "conv1d"  # a 4-D weight declared a 1-D conv's
    with pytest.raises(packnet.PackFormatError, match=r"must both be the declared 3-D shape"):
        packnet.read_pack(write_pack(tmp_path / "kind.pack", tensors, meta))
    linear = next(entry for entry in meta["layers"] if len(entry["shape"]) == 2)
    meta["layers"][0]["kind"] = "conv2d"
    linear["kind"] = "embedding"  # the right shape, the wrong module
    with pytest.raises(packnet.PackFormatError, match=r"is a Linear in the model, not the pack's kind, embedding"):
        packnet.load_pack(write_pack(tmp_path / "kind.pack", tensors, meta), backend="reference")
