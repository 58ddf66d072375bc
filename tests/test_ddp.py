"""PackNet under DistributedDataParallel: two CPU processes (gloo) launched by torchrun end bit-identical.

The test runs this file as the training script of ``python -m torch.distributed.run --standalone`` (which binds a
free port), so it goes through exactly the launch path the README documents. The ranks seed their generators
differently and see different data, so they stay identical only if the trainer synchronises what DDP does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NUM_TASKS = 3
WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parent.parent


def _probe() -> torch.Tensor:
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1234))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _worker(out_dir: str) -> None:
    """One rank: train 3 tasks on a DDP-wrapped small_cnn and write everything the test compares."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import packnet
    import packnet.training
    from packnet import distributed

    device = distributed.init_from_env("gloo")
    rank = distributed.get_rank()
    torch.manual_seed(100 + rank)  # different on purpose: DDP and the trainer must make the ranks agree
    progress_disabled = []
    real_tqdm = packnet.training.tqdm

    def recording_tqdm(*args, **kwargs):
        progress_disabled.append(bool(kwargs.get("disable")))
        return real_tqdm(*args, **kwargs)

    packnet.training.tqdm = recording_tqdm
    model = distributed.wrap_ddp(packnet.small_cnn(width=4), device)
    trainer = packnet.PackNet(model, prune_ratio=0.5, head="head")
    probe = _probe()
    results: dict[str, torch.Tensor] = {}
    losses = []
    samplers = []
    for task in range(1, NUM_TASKS + 1):
        generator = torch.Generator().manual_seed(10 * task)  # the task's dataset; each rank draws its own shard
        dataset = TensorDataset(
            torch.randn(36, 1, 8, 8, generator=generator), torch.randint(0, 2, (36,), generator=generator)
        )
        sampler = DistributedSampler(dataset, shuffle=True, seed=task, drop_last=True)
        samplers.append(sampler)
        data = distributed.DeviceBatches(DataLoader(dataset, batch_size=8, sampler=sampler, drop_last=True), device)
        if task < NUM_TASKS:
            trainer.learn_task(data, _sgd, epochs=2, finetune_epochs=1, show_progress=True)
        else:  # the same steps by hand, to see the losses train_epochs reports
            trainer.start_task()
            losses.append(trainer.train_epochs(data, _sgd(trainer.trainable_parameters()), 2))
            for name, layer in trainer.layers.items():  # mid-task: equal only if start_task synchronised the ranks
                results[f"before_prune/{name}"] = layer.weight.detach().clone()
            trainer.prune()
            losses.append(trainer.train_epochs(data, _sgd(trainer.trainable_parameters()), 1, desc="finetune"))
            trainer.end_task()
        for earlier in range(1, task + 1):
            results[f"output/task{earlier}/after{task}"] = trainer.predict(probe, earlier)
    for name, layer in trainer.layers.items():
        results[f"weight/{name}"] = layer.weight.detach()
        results[f"task_ids/{name}"] = trainer.task_ids[name]
    for task, state in enumerate(trainer.task_states, 1):
        for key, value in state.items():
            results[f"state/{task}/{key}"] = value
    results["progress_disabled"] = torch.tensor(progress_disabled)
    results["num_tasks"] = torch.tensor(trainer.num_tasks)
    results["losses"] = torch.tensor(losses, dtype=torch.float64)
    results["sampler_epochs"] = torch.tensor([sampler.epoch for sampler in samplers])
    save_file({key: value.contiguous() for key, value in results.items()}, os.path.join(out_dir, f"rank{rank}.st"))
    distributed.cleanup()


def test_two_ranks_end_identical_and_keep_earlier_tasks(tmp_path):
    from safetensors.torch import load_file

    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on localhost with a port the OS picks: never collides with another run
        f"--nproc_per_node={WORLD_SIZE}",
        __file__,
        str(tmp_path),
    ]
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 150 s: {error.stderr!s}"[-4000:])
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = [load_file(tmp_path / f"rank{rank}.st") for rank in range(WORLD_SIZE)]

    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        if key != "progress_disabled":
            assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
    assert int(ranks[0]["num_tasks"]) == NUM_TASKS
    # The trainer advanced each task's DistributedSampler: 3 passes per task (2 training, 1 fine-tuning).
    assert ranks[0]["sampler_epochs"].tolist() == [2, 5, 8]
    assert torch.isfinite(ranks[0]["losses"]).all()  # equal on both ranks (checked above): averaged over ranks
    # Ids hold every task, so the comparison above covered three real pruning rounds.
    ids = torch.cat([value.flatten() for key, value in ranks[0].items() if key.startswith("task_ids/")])
    assert set(ids.unique().tolist()) == set(range(NUM_TASKS + 1))
    # BatchNorm statistics are per task and were gathered on different data per rank before the sync.
    assert not torch.equal(ranks[0]["state/1/features.1.running_mean"], ranks[0]["state/2/features.1.running_mean"])
    # Earlier tasks' outputs stay bit-identical while later tasks train.
    for task in range(1, NUM_TASKS + 1):
        first = ranks[0][f"output/task{task}/after{task}"]
        for later in range(task + 1, NUM_TASKS + 1):
            assert torch.equal(ranks[0][f"output/task{task}/after{later}"], first), (task, later)
    assert not torch.equal(ranks[0]["output/task1/after3"], ranks[0]["output/task3/after3"])
    # Progress bars: shown on rank 0 only (two bars per task: train and fine-tune).
    assert ranks[0]["progress_disabled"].tolist() == [False] * (2 * NUM_TASKS)
    assert ranks[1]["progress_disabled"].tolist() == [True] * (2 * NUM_TASKS)


if __name__ == "__main__":
    _worker(sys.argv[1])
