"""The PackNet training loop: zero forgetting, ownership, pruning and its errors."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.pruning import magnitude_task_ids, prune_ratio_for, release_smallest, release_smallest_blocks
from packnet_kernels import tile_map

DATA_PACK = Path(__file__).parent / "data" / "golden_v2.pack"

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


@pytest.mark.parametrize(
    ("optimizer", "granularity"),
    [(name, "element") for name in sorted(OPTIMIZERS)] + [("sgd_momentum_wd", (4, 4)), ("adamw", (2, 8))],
)
@pytest.mark.parametrize("builder", ["small_cnn", "mlp"])
def test_earlier_tasks_stay_bit_identical(optimizer, granularity, builder):
    torch.manual_seed(0)
    image = builder == "small_cnn"
    model = packnet.small_cnn(width=4) if image else packnet.mlp(in_features=12, hidden=16)
    trainer = packnet.PackNet(model, prune_ratio=0.5, prune_granularity=granularity, head="head")
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
    if granularity != "element":
        # Every block of the kernels' layout has one owner or none: its smallest and largest owner agree, and no
        # block mixes free and owned weights.
        for ids in trainer.task_ids.values():
            cells = tile_map(ids, granularity)
            any_free = tile_map((ids == 0).to(torch.uint8), granularity)[1] == 1
            assert torch.equal(cells[0], cells[1]) and not (any_free & (cells[1] > 0)).any()


def test_release_smallest_blocks_picks_whole_blocks_by_norm():
    """Linear: 4 x 6 ids in 2 x 3 blocks; the task owns 3 of the 4 blocks; with ratio 2/3 the two of smallest L2
    norm go (ties by position), the fourth block (another task's) is never touched. Conv: blocks over the
    (kh, kw, channel) columns map back to the right elements."""
    weight = torch.tensor(
        [
            [1.0, 1.0, 1.0, 9.0, 9.0, 9.0],
            [1.0, 1.0, 1.0, 9.0, 9.0, 9.0],
            [2.0, 2.0, -2.0, 0.1, 0.1, 0.1],
            [2.0, 2.0, 2.0, 0.1, 0.1, 0.1],
        ]
    )
    task_ids = torch.full((4, 6), 1, dtype=torch.uint8)
    task_ids[2:, 3:] = 2
    release = release_smallest_blocks(weight, task_ids, 1, 2 / 3, (2, 3))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, :3] = True  # norms: block (0, 0) sqrt(6), (1, 0) sqrt(24) < (0, 1) sqrt(486)
    assert torch.equal(release, expected)
    assert not release_smallest_blocks(weight, task_ids, 2, 0.4, (2, 3)).any()  # round(0.4 * 1) = 0 blocks
    conv_ids = torch.ones(2, 3, 2, 2, dtype=torch.uint8)  # columns (kh, kw, channel): 12 per output channel
    conv_weight = torch.ones(2, 3, 2, 2)
    conv_weight[0, :, 0, 0] = 0.5  # tap (0, 0), every channel: columns 0..2 of row 0
    conv_release = release_smallest_blocks(conv_weight, conv_ids, 1, 0.25, (1, 3))  # 8 blocks, release 2
    assert conv_release.shape == (2, 3, 2, 2) and int(conv_release.sum()) == 6
    assert conv_release[0, :, 0, 0].all() and conv_release[0, :, 0, 1].all()  # first two blocks (ties by position)


def test_block_pruning_releases_the_requested_fraction_of_blocks():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator)
    task_ids = torch.ones(64, 96, dtype=torch.uint8)
    release = release_smallest_blocks(weight, task_ids, 1, 0.5, (32, 32))
    assert int(release.sum()) == 3 * 32 * 32  # 6 blocks, half released
    cells = tile_map(torch.where(release, 0, task_ids).to(torch.uint8))
    assert sorted(cells[1].flatten().tolist()) == [0, 0, 0, 1, 1, 1]


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
        (dict(prunable=lambda name, module: isinstance(module, nn.ReLU)), TypeError, r"is a ReLU; only Linear/Conv1d"),
        (dict(prunable=lambda name, module: False), ValueError, r"no prunable"),
        (dict(prune_granularity="block"), ValueError, r"'element' or a \(rows, cols\) pair"),
        (dict(prune_granularity=(32, 0)), ValueError, r"pair of positive ints"),
        (dict(prune_granularity=(32, 32, 1)), ValueError, r"pair of positive ints"),
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


class _TokenNet(nn.Module):
    """Embedding -> Conv1d -> BatchNorm1d -> pooled Linear head: every kind of state a resume must carry."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        hidden = torch.relu(self.norm(self.conv(self.embed(tokens).transpose(1, 2))))
        return self.head(hidden.mean(dim=2))


def _token_data():
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 20, (32, 6), generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    # shuffle=True: each epoch's order comes from torch's global generator, which a resume must restore.
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=8, shuffle=True)


def _learn(trainer, tasks):
    data = _token_data()
    for _ in range(tasks):
        trainer.learn_task(
            data,
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
            epochs=2,
            finetune_epochs=1,
            show_progress=False,
        )


def test_a_resumed_sequence_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Four tasks in one go, and two tasks, a checkpoint, a fresh model (other weights, other generator state)
    resumed from it, two more tasks: the same task ids, weights, per-task state and predictions, bit for bit."""
    torch.manual_seed(0)
    straight = packnet.PackNet(_TokenNet(), prune_ratio=[0.5, 0.5, 0.5, 0.5], head="head", share=packnet.is_norm)
    _learn(straight, 4)

    torch.manual_seed(0)
    first = packnet.PackNet(_TokenNet(), prune_ratio=[0.5, 0.5, 0.5, 0.5], head="head", share=packnet.is_norm)
    _learn(first, 2)
    meta = first.save_checkpoint(tmp_path / "after2.ckpt")
    assert meta["num_tasks"] == 2 and meta["layers"] == {"embed": "embedding", "conv": "conv1d"}
    torch.manual_seed(99)
    fresh = _TokenNet()
    torch.randn(100)  # the generator moves on: the checkpoint must put it back
    resumed = packnet.PackNet.load_checkpoint(tmp_path / "after2.ckpt", fresh)
    assert resumed.num_tasks == 2 and resumed.state_shared_keys == first.state_shared_keys
    _learn(resumed, 2)

    tokens = _token_data().dataset.tensors[0]
    for name in straight.layers:
        assert torch.equal(straight.task_ids[name], resumed.task_ids[name]), name
        assert torch.equal(straight.weights[name], resumed.weights[name]), name
    assert all(
        torch.equal(a[key], b[key]) for a, b in zip(straight.task_states, resumed.task_states, strict=True) for key in a
    )
    for task in range(1, 5):
        assert torch.equal(straight.predict(tokens, task), resumed.predict(tokens, task)), task


def test_checkpoint_errors(tmp_path):
    torch.manual_seed(0)
    trainer = packnet.PackNet(_TokenNet(), head="head")
    trainer.start_task()
    with pytest.raises(RuntimeError, match="task 1 is being trained; save a checkpoint between tasks"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    trainer.prune()
    trainer.end_task()
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    with pytest.raises(ValueError, match=r"does not fit the checkpoint \(head 'head' is not a submodule"):
        packnet.PackNet.load_checkpoint(tmp_path / "one.ckpt", nn.Sequential(nn.Linear(4, 4)))
    renamed = _TokenNet()
    renamed.embedding = renamed.embed
    del renamed.embed
    with pytest.raises(ValueError, match=r"shared layers \{'conv': 'conv1d', 'embedding': 'embedding'\} are not"):
        packnet.PackNet.load_checkpoint(tmp_path / "one.ckpt", renamed, prunable=packnet.training.default_prunable)
    wider = _TokenNet()
    wider.head = nn.Linear(8, 5)
    with pytest.raises(ValueError, match="not the checkpoint's architecture"):
        packnet.PackNet.load_checkpoint(tmp_path / "one.ckpt", wider)
    data = bytearray((tmp_path / "one.ckpt").read_bytes())
    data[-1] ^= 1
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        packnet.PackNet.load_checkpoint(tmp_path / "bad.ckpt", _TokenNet())
    with pytest.raises(ValueError, match="not a packnet checkpoint"):
        packnet.PackNet.load_checkpoint(DATA_PACK, _TokenNet())


def test_a_task_without_any_free_weight_warns_with_the_fix():
    """prune_ratio 0 releases nothing, so task 2 finds every layer full: it can only train its own state."""
    trainer = packnet.PackNet(packnet.mlp(in_features=12, hidden=8, depth=1), prune_ratio=0.0, head="head")
    trainer.learn_task(_task_data(0, image=False, batches=1), torch.optim.SGD, 1, show_progress=False)
    with pytest.warns(packnet.CapacityWarning) as record:
        trainer.start_task()
    (warning,) = record
    assert str(warning.message) == (
        "task 2 starts with no free weight in any of the 1 prunable layers: it trains only its own state (biases,"
        " norms, head) on the frozen weights of tasks 1..1; to leave room for later tasks, release more of each"
        " task's weights (a larger prune_ratio than 0.0)"
    )


def test_some_full_layers_are_normal_and_only_logged(recwarn, caplog):
    """A layer of one 4x4 block: task 1 keeps its only block (half of one rounds to none), the other layer still has
    room. Task 2 trains there: no warning, an INFO line naming the full layer."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    trainer = packnet.PackNet(model, prune_ratio=0.5, prune_granularity=(4, 4), head="4")
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    trainer.learn_task(data, torch.optim.SGD, 1, show_progress=False)
    with caplog.at_level("INFO", logger="packnet.training"):
        trainer.start_task()
    assert [str(w.message) for w in recwarn if issubclass(w.category, packnet.CapacityWarning)] == []
    assert "task 2: no free weight left in 0; it uses the frozen weights of tasks 1..1 there" in caplog.text
