"""packnet.cuda_graphs (packnet/graphs.py): a packed model served by one graph per batch bucket and task, and its
tracing in one graph.

On the CPU a stand-in records a "graph" as the forward itself (replaying reruns it on the graph's own input and task
buffers and rewrites the captured outputs in place, which is what a CUDA graph replay does): the buckets, the keys,
what is copied in and sliced out, and that one mixed graph serves every mix of tasks are checked there. The real
capture and replay run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.graphs import MIXED, GraphedModel, _tree

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed_cnn(num_tasks=3):
    """Conv (16 channels: a mixed batch runs in one launch), ReLU, linear: every layer takes a task tensor on the
    device, as a mixed graph needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 8))
    ids = {
        name: torch.randint(0, num_tasks + 1, model.get_submodule(name).weight.shape, dtype=torch.uint8)
        for name in ("0", "3")
    }
    return packnet.swap_packed_(model, ids, num_tasks, backend="triton").to(DEVICE).eval()


class _RecordingCapture:
    """A CPU stand-in for CUDA graph capture: ``replay`` reruns the forward and writes into the captured outputs."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def capture(self, forward):
        self.captures += 1
        outputs = forward()

        def replay():
            self.replays += 1
            fresh = forward()
            flat_outputs, flat_fresh = [], []
            _tree(outputs, flat_outputs.append)
            _tree(fresh, flat_fresh.append)
            for kept, new in zip(flat_outputs, flat_fresh, strict=True):
                kept.copy_(new)

        return replay, outputs


def _eager(model, x, task):
    with torch.no_grad():
        return model(x, task=task)


@pytest.mark.interpreter
def test_graph_keys_follow_the_buckets_and_tasks():
    model = _packed_cnn()
    example = torch.empty(5, 16, 4, 4, device=DEVICE)
    capture = _RecordingCapture()
    graphed = GraphedModel(model, example, [2, MIXED, 2], capture=capture)
    assert graphed.batch_sizes == (1, 2, 4, 5)
    assert graphed.keys == [(b, t) for b in (1, 2, 4, 5) for t in (2, MIXED)] and capture.captures == 8
    assert [graphed.bucket(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    assert graphed.graph_key(3, 2) == (4, 2)
    assert graphed.graph_key(3, 1) == (4, MIXED)  # a task without its own graph: the bucket's mixed graph
    assert graphed.graph_key(3, torch.tensor([1, 2, 3])) == (4, MIXED)
    assert GraphedModel(model, example, [1], batch_sizes=[8, 2, 2], capture=capture).batch_sizes == (2, 8)


@pytest.mark.interpreter
def test_replays_equal_the_eager_model_for_every_batch_and_task():
    """Int-task graphs and the mixed graph, batches that fill their bucket and batches padded into one."""
    model = _packed_cnn()
    capture = _RecordingCapture()
    graphed = GraphedModel(model, torch.empty(4, 16, 4, 4, device=DEVICE), [1, 3, MIXED], capture=capture)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 2, 3, 4):
        x = torch.randn(batch, 16, 4, 4, generator=generator).to(DEVICE)
        for task in (1, 2, 3):
            assert torch.equal(graphed(x, task=task), _eager(model, x, task))
        tasks = torch.randint(1, 4, (batch,), generator=generator).to(DEVICE)
        assert torch.equal(graphed(x, task=tasks), _eager(model, x, tasks))
    assert graphed.batch_sizes == (1, 2, 4) and capture.captures == 3 * 3  # replays only, no new capture


@pytest.mark.interpreter
def test_one_mixed_graph_serves_every_mix_of_tasks():
    model = _packed_cnn()
    capture = _RecordingCapture()
    graphed = GraphedModel(model, torch.empty(6, 16, 4, 4, device=DEVICE), [MIXED], batch_sizes=[6], capture=capture)
    x = torch.randn(6, 16, 4, 4, device=DEVICE)
    mixes = [[1, 1, 1, 1, 1, 1], [3, 2, 1, 3, 2, 1], [2, 2, 3, 3, 1, 1]]
    results = []
    for mix in mixes:
        tasks = torch.tensor(mix, device=DEVICE)
        results.append(graphed(x, task=tasks))
        assert torch.equal(results[-1], _eager(model, x, tasks))
    assert capture.captures == 1 and capture.replays == 3 and not torch.equal(results[0], results[1])
    per_task = {task: _eager(model, x, task) for task in (1, 2, 3)}
    for row, task in enumerate(mixes[1]):  # row for row what the task alone gives
        assert torch.equal(results[1][row], per_task[task][row])


@pytest.mark.interpreter
def test_outputs_are_copies_unless_asked_for_views():
    model = _packed_cnn()
    example = torch.empty(2, 16, 4, 4, device=DEVICE)
    first, second = torch.randn(2, 2, 16, 4, 4, device=DEVICE)
    copies = GraphedModel(model, example, [1], batch_sizes=[2], capture=_RecordingCapture())
    kept = copies(first, task=1)
    copies(second, task=1)
    assert torch.equal(kept, _eager(model, first, 1))
    views = GraphedModel(model, example, [1], batch_sizes=[2], capture=_RecordingCapture(), clone_outputs=False)
    kept = views(first, task=1)
    views(second, task=1)
    assert torch.equal(kept, _eager(model, second, 1))  # the graph's own output, rewritten by the next replay


@pytest.mark.interpreter
def test_calls_and_captures_the_graphs_cannot_serve_are_refused():
    model = _packed_cnn()
    example = torch.empty(4, 16, 4, 4, device=DEVICE)
    graphed = GraphedModel(model, example, [1, 2], capture=_RecordingCapture())
    x = torch.randn(3, 16, 4, 4, device=DEVICE)
    cases = [
        (lambda: graphed(torch.randn(5, 16, 4, 4, device=DEVICE), task=1), ValueError, "a batch of 5 has no graph"),
        (lambda: graphed(torch.randn(3, 16, 4, 5, device=DEVICE), task=1), ValueError, r"take \[batch, \*\(16, 4, 4"),
        (lambda: graphed(x.double(), task=1), ValueError, "take torch.float32 inputs"),
        (lambda: graphed(x, task=4), ValueError, r"task 4 is outside 1\.\.3"),
        (lambda: graphed(x, task=3), ValueError, "no graph for task 3"),
        (lambda: graphed(x, task=torch.tensor([1, 2, 1], device=DEVICE)), ValueError, "'mixed' for task tensors"),
        (lambda: graphed(x, task="1"), TypeError, "task must be an int or an integer tensor"),
        (lambda: GraphedModel(model.train(), example, [1], capture=_RecordingCapture()), ValueError, "training mode"),
        (lambda: GraphedModel(nn.Linear(2, 2).eval(), example, [1]), ValueError, "no packed modules"),
        (lambda: GraphedModel(model.eval(), example, []), ValueError, "give the tasks to capture"),
        (lambda: GraphedModel(model, example, [0]), ValueError, "task 0 is neither 'mixed' nor an int in 1..3"),
        (lambda: GraphedModel(model, example, [1], batch_sizes=[0]), ValueError, "batch_sizes must be positive"),
        (lambda: GraphedModel(model, "x", [1]), TypeError, "example must be a batch tensor"),
    ]
    if DEVICE == "cpu":
        cases.append((lambda: packnet.cuda_graphs(model, example, [1]), ValueError, "CUDA graphs need a CUDA model"))
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    with_switch = nn.Sequential(model, packnet.TaskSwitch([nn.Linear(8, 2) for _ in range(3)]))
    with_switch = packnet.accept_task_argument(with_switch).eval()
    with pytest.raises(ValueError, match=r"1 \(TaskSwitch\) runs a mixed batch one task at a time"):
        GraphedModel(with_switch, example, [MIXED], capture=_RecordingCapture())
    GraphedModel(with_switch, example, [1], batch_sizes=[4], capture=_RecordingCapture())  # int tasks: fine
    mixed_only = GraphedModel(model.eval(), example, [MIXED], capture=_RecordingCapture())
    with pytest.raises(ValueError, match="one task per sample"):
        mixed_only(x, task=torch.tensor([1, 2], device=DEVICE))


@pytest.mark.interpreter
def test_a_packed_model_given_task_tensors_traces_into_one_graph():
    """The route through torch.compile: the packed model with a task tensor passed per call compiles to one graph
    with no breaks, and new mixes of tasks (same shapes) reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _packed_cnn()
    x = torch.randn(4, 16, 4, 4, device=DEVICE)
    _eager(model, x, torch.tensor([1, 1, 1, 1], device=DEVICE))  # eager calls make the tile maps the graph uses
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for mix in ([1, 2, 3, 1], [3, 3, 2, 1]):
            tasks = torch.tensor(mix, device=DEVICE)
            assert torch.equal(compiled(x, task=tasks), model(x, task=tasks))
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_cuda_graph_replays_equal_eager_calls():
    """Real capture and replay: int-task and mixed graphs, a full and a padded bucket; no capture afterwards."""
    model = _packed_cnn()
    graphed = packnet.cuda_graphs(model, torch.empty(4, 16, 4, 4, device="cuda"), [2, MIXED], batch_sizes=[4])
    x = torch.randn(4, 16, 4, 4, device="cuda")
    tasks = torch.tensor([3, 1, 2, 1], device="cuda")
    for _ in range(2):
        assert torch.equal(graphed(x, task=2), _eager(model, x, 2))
        assert torch.equal(graphed(x, task=tasks), _eager(model, x, tasks))
        assert torch.equal(graphed(x, task=1), _eager(model, x, 1))  # through the mixed graph
    padded = graphed(x[:3], task=tasks[:3])
    torch.testing.assert_close(padded, _eager(model, x[:3], tasks[:3]))
