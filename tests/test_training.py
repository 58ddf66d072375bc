"""The PackNet training loop: zero forgetting, ownership, pruning and its errors."""

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.pruning import magnitude_task_ids, prune_ratio_for, release_smallest

OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
}


def _task_data(seed, image=True, batches=3):
    generator = torch.Generator().manual_seed(seed)
    shape = (16, 1, 8, 8) if image else (16, 12)
    return [
        (torch.randn(shape, generator=generator), torch.randint(0, 2, (16,), generator=generator))
        for _ in range(batches)
    ]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("builder", ["small_cnn", "mlp"])
def test_earlier_tasks_stay_bit_identical(optimizer, builder):
    torch.manual_seed(0)
    image = builder == "small_cnn"
    model = packnet.small_cnn(width=4) if image else packnet.mlp(in_features=12, hidden=16)
    trainer = packnet.PackNet(model, prune_ratio=0.5, head="head")
    probe = torch.randn(10, 1, 8, 8) if image else torch.randn(10, 12)
    recorded, weights_after = {}, {}
    for task in range(1, 5):
        trainer.learn_task(
            _task_data(task, image), OPTIMIZERS[optimizer], epochs=2, finetune_epochs=1, show_progress=False
        )
        recorded[task] = trainer.predict(probe, task)
        weights_after[task] = {name: layer.weight.detach().clone() for name, layer in trainer.layers.items()}
        for earlier in range(1, task + 1):
            assert torch.equal(trainer.predict(probe, earlier), recorded[earlier]), (earlier, task)
        # Weights of earlier tasks are bitwise unchanged; freed weights are exactly zero.
        for name, ids in trainer.task_ids.items():
            weight = trainer.layers[name].weight
            for earlier in range(1, task):
                owned = ids == earlier
                assert torch.equal(weight[owned], weights_after[earlier][name][owned])
            assert torch.equal(weight[ids == 0], torch.zeros(int((ids == 0).sum())))
    # Later tasks changed the network, so the equality above is not vacuous.
    assert not torch.equal(recorded[4], recorded[1])


def test_predict_leaves_the_training_state_untouched():
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.small_cnn(width=4), head="head")
    trainer.learn_task(_task_data(1), OPTIMIZERS["adamw"], epochs=1, show_progress=False)
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    trainer.model.train()
    trainer.predict(torch.randn(3, 1, 8, 8), 1)
    assert trainer.model.training
    after = trainer.model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_ownership_follows_the_prune_schedule():
    torch.manual_seed(0)
    model = packnet.mlp(in_features=12, hidden=16, depth=1)
    trainer = packnet.PackNet(model, prune_ratio=[0.75, 0.5], head="head")
    for task in range(1, 3):
        trainer.learn_task(_task_data(task, image=False), OPTIMIZERS["sgd_momentum_wd"], 1, show_progress=False)
    (layer,) = trainer.ownership()
    assert layer.layer == "features.0" and layer.shape == (16, 12) and layer.total == 192
    # Task 1 keeps 25% of 192 = 48; task 2 takes the other 144 and keeps half = 72; 72 stay free.
    assert layer.owned == (72, 48, 72)


def test_release_smallest_releases_exactly_the_smallest_owned():
    weight = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 9.0]])
    task_ids = torch.tensor([[1, 1, 2], [2, 2, 2]], dtype=torch.uint8)
    release = release_smallest(weight, task_ids, 2, 0.5)
    assert torch.equal(release, torch.tensor([[False, False, True], [False, True, False]]))


def test_magnitude_task_ids_nests_tasks_by_magnitude():
    weight = torch.arange(1.0, 17.0)
    ids = magnitude_task_ids(weight, num_tasks=3, prune_ratio=0.5)
    assert ids.tolist() == [0, 0, 3, 3, 2, 2, 2, 2] + [1] * 8


def test_heads_are_per_task_and_reinitialised():
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.mlp(in_features=12, hidden=8), head="head")
    trainer.learn_task(_task_data(1, image=False), OPTIMIZERS["adamw"], 1, show_progress=False)
    head_1 = trainer.task_states[0]["head.weight"]
    trainer.start_task()
    assert not torch.equal(trainer.model.head.weight, head_1)
    assert "features.0.weight" not in trainer.task_states[0] and "features.0.bias" in trainer.task_states[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prune_ratio=1.0), ValueError, r"prune_ratio must be in \[0, 1\)"),
        (dict(prune_ratio=-0.1), ValueError, r"prune_ratio must be in \[0, 1\)"),
        (dict(head="classifier"), ValueError, r"head 'classifier' is not a submodule"),
        (dict(prunable=lambda name, module: isinstance(module, nn.ReLU)), TypeError, r"only Linear/Conv2d"),
        (dict(prunable=lambda name, module: False), ValueError, r"no prunable"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        packnet.PackNet(packnet.mlp(), **kwargs)


def test_life_cycle_errors():
    trainer = packnet.PackNet(packnet.mlp(), prune_ratio=[0.5], head="head")
    with pytest.raises(RuntimeError, match="call start_task"):
        trainer.prune()
    trainer.start_task()
    with pytest.raises(RuntimeError, match="still being trained"):
        trainer.start_task()
    trainer.end_task()
    with pytest.raises(ValueError, match="schedule has 1 entries but task 2"):
        prune_ratio_for(trainer.prune_ratio, 2)
    with pytest.raises(ValueError, match=r"finished task in 1\.\.1, got 2"):
        trainer.predict(torch.randn(1, 64), 2)
