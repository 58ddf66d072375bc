"""Write the golden pack of the current format and its expected outputs (tests/data/golden_v2.pack,
golden_v2_expected.safetensors).

The golden files pin a pack format version: tests/test_pack_fuzz.py loads the committed bytes and asserts the same
outputs bit for bit, so a change to the writer or the reader that alters the format fails CI. The test never runs
this script. Run it by hand only to create the golden files of a new format version (then name them ``_v3``, keep
the older files, and keep testing that older packs still load). golden_v1.pack and golden_v1_expected.safetensors
were written by this script under format version 1 (before shared state existed; every BatchNorm per task) and are
never regenerated: today's writer writes version 2.

    PYTHONPATH=. .venv/bin/python tests/data/make_golden.py [--out-dir tests/data]

The pack is a 3-task ``packnet.small_cnn(width=2)`` (convolutions, BatchNorm, a Linear with per-task bias, a head);
in version 2 the BatchNorm ``features.4`` is shared by all tasks, and the pack records its module-tree fingerprint
and input shape.
No training is involved, so the script writes the same bytes on every run: the weights are small integers drawn
from a seeded generator, the task ids come from nested magnitude pruning, and every per-task value is a multiple of
1/4. Each BatchNorm's ``running_var + eps`` rounds in float32 to exactly 4, 16 or 64, so its scale is a power of
two. Every product and partial sum in the forward pass is then exactly representable in float32: the outputs do not
depend on the order of summation, FMA contraction or the CPU's vector width, and ``torch.equal`` against the stored
outputs holds on any machine. The script checks that claim against an independent float64 forward before writing.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

import packnet
from packnet.models import arch_spec, module_fingerprint
from packnet.pruning import magnitude_task_ids

NUM_TASKS = 3
SPEC = {"in_channels": 1, "num_classes": 3, "width": 2, "image_size": 8}
SEED = 20240601
PACK_NAME = "golden_v2.pack"
EXPECTED_NAME = "golden_v2_expected.safetensors"
SHARED_MODULE = "features.4"  # a BatchNorm whose state all tasks share
BN_EPS = 1e-5  # nn.BatchNorm's default, which small_cnn uses


def _quarters(generator: torch.Generator, shape, low: int, high: int) -> torch.Tensor:
    """Random multiples of 1/4 in [low/4, high/4]."""
    return torch.randint(low, high + 1, shape, generator=generator).float() / 4


def _exact_running_var(generator: torch.Generator, channels: int) -> torch.Tensor:
    """float32 variances v with ``float32(v + eps)`` exactly 4, 16 or 64 (so 1/sqrt is a power of two)."""
    targets = torch.tensor([4.0, 16.0, 64.0])[torch.randint(0, 3, (channels,), generator=generator)]
    var = (targets.double() - BN_EPS).float()
    assert torch.equal(var + torch.tensor(BN_EPS, dtype=torch.float32), targets), "variance is not exact"
    return var


def build_pack() -> packnet.Pack:
    generator = torch.Generator().manual_seed(SEED)
    model = packnet.small_cnn(**SPEC)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name != "head":
            magnitude = torch.randint(1, 3, module.weight.shape, generator=generator).float()
            sign = torch.randint(0, 2, module.weight.shape, generator=generator).float() * 2 - 1
            weight = magnitude * sign
            ids = magnitude_task_ids(weight, NUM_TASKS, 0.5)
            layers[name] = (torch.where(ids != 0, weight, torch.zeros(())), ids)
    task_states, shared_state = [], {}
    for task in range(1, NUM_TASKS + 1):
        state = {}
        for key, value in model.state_dict().items():
            if key[: -len(".weight")] in layers:
                continue
            module_name, _, field = key.rpartition(".")
            if module_name == SHARED_MODULE and task > 1:
                continue
            target = shared_state if module_name == SHARED_MODULE else state
            module = model.get_submodule(module_name)
            if field == "num_batches_tracked":
                target[key] = torch.tensor(100 * task, dtype=torch.int64)
            elif field == "running_var":
                target[key] = _exact_running_var(generator, value.numel())
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and field == "weight":
                target[key] = _quarters(generator, value.shape, 2, 6)  # 0.5 .. 1.5
            elif module_name == "head" and field == "weight":
                target[key] = _quarters(generator, value.shape, -4, 4)
            else:  # biases and running means
                target[key] = _quarters(generator, value.shape, -4, 4)
        task_states.append(state)
    return packnet.Pack(
        NUM_TASKS,
        layers,
        task_states,
        arch_spec(model),
        shared_state=shared_state,
        fingerprint=module_fingerprint(model),
        input_shape=[SPEC["in_channels"], SPEC["image_size"], SPEC["image_size"]],
    )


def exact_forward(pack: packnet.Pack, x: torch.Tensor, task: int) -> torch.Tensor:
    """The outputs in float64 with BatchNorm's 1/sqrt(var + eps) taken as the exact power of two float32 gives."""
    model = packnet.small_cnn(**SPEC).double().eval()
    state = {key: value.double() for key, value in pack.task_state_dict(task).items()}
    stored = {**pack.shared_state, **pack.task_states[task - 1]}
    for key in list(state):
        if key.endswith("running_var"):
            state[key] = (stored[key] + torch.tensor(BN_EPS, dtype=torch.float32)).double()
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 0.0
    with torch.no_grad():
        return model(x.double())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    pack = build_pack()
    pack_path = os.path.join(args.out_dir, PACK_NAME)
    packnet.save_pack(pack, pack_path)
    x = torch.randint(
        -2,
        3,
        (4, SPEC["in_channels"], SPEC["image_size"], SPEC["image_size"]),
        generator=torch.Generator().manual_seed(SEED + 1),
    ).float()
    expected = {"input": x}
    for fuse in (False, True):
        model = packnet.load_pack(pack_path, fuse=fuse, backend="reference")
        for task in range(1, NUM_TASKS + 1):
            with torch.no_grad(), packnet.set_task(model, task):
                output = model(x)
            exact = exact_forward(pack, x, task)
            if not torch.equal(output.double(), exact):
                raise SystemExit(f"task {task} (fuse={fuse}) is not exact in float32: adjust the value ranges")
            if fuse:
                torch.testing.assert_close(output, expected[f"output/task{task}"], rtol=0, atol=0)
            expected[f"output/task{task}"] = output
    outputs = [expected[f"output/task{task}"] for task in range(1, NUM_TASKS + 1)]
    if any(torch.equal(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1 :]):
        raise SystemExit("two tasks give the same outputs: the golden test would not tell them apart")
    save_file(expected, os.path.join(args.out_dir, EXPECTED_NAME))
    with open(pack_path, "rb") as handle:
        print(f"{PACK_NAME}: {os.path.getsize(pack_path)} bytes, sha256 {hashlib.sha256(handle.read()).hexdigest()}")


if __name__ == "__main__":
    main()
