"""Hugging Face transformers models used as they are: tiny random-init models built from their configs (no download),
trained for two tasks with PackNet and packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import packnet

transformers = pytest.importorskip("transformers")

VOCAB, LABELS, BATCH, SEQUENCE = 40, 3, 6, 5


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=LABELS,
    )
    return transformers.BertForSequenceClassification(config), "classifier"


def _distilbert():
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=LABELS
    )
    return transformers.DistilBertForSequenceClassification(config), "classifier"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=LABELS,
        pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config), "score"


def _logits_loss(output, targets):
    return F.cross_entropy(output.logits, targets)


def _trained(build):
    """A model trained for two tasks (task 1 checked bitwise after task 2), its trainer and a token batch."""
    torch.manual_seed(0)
    model, head = build()
    trainer = packnet.PackNet(model, prune_ratio=0.5, head=head)
    tokens = torch.randint(1, VOCAB, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1))
    task1 = None
    for task in (1, 2):
        targets = torch.randint(0, LABELS, (BATCH,), generator=torch.Generator().manual_seed(10 + task))
        trainer.learn_task(
            [(tokens, targets)],
            lambda p: torch.optim.SGD(p, lr=0.2),
            epochs=2,
            finetune_epochs=1,
            loss_fn=_logits_loss,
            show_progress=False,
        )
        if task == 1:
            task1 = trainer.predict(tokens, 1).logits
    assert torch.equal(trainer.predict(tokens, 1).logits, task1)
    return trainer, tokens


MODELS = {"bert": _bert, "distilbert": _distilbert, "llama": _llama}


@pytest.mark.parametrize("name", MODELS)
def test_a_task_argument_selects_that_task_in_a_hugging_face_model(name):
    """Every HF forward takes ``**kwargs``: ``packed(x, task=t)`` once ran the active task and said nothing. Each
    way to choose a task gives exactly that task's outputs, those of the trained model."""
    trainer, tokens = _trained(MODELS[name])
    packed = packnet.compile_pack(trainer)
    with torch.no_grad():
        expected = {task: trainer.predict(tokens, task).logits for task in (1, 2)}
        assert not torch.equal(expected[1], expected[2])
        for active, asked in ((1, 2), (2, 1)):
            packnet.set_task(packed, active)
            assert torch.equal(packed(tokens, task=asked).logits, expected[asked])
            assert torch.equal(packed(input_ids=tokens, task=asked).logits, expected[asked])
            assert torch.equal(packed(tokens).logits, expected[active])
            with packnet.set_task(packed, asked):
                assert torch.equal(packed(tokens).logits, expected[asked])
        with pytest.raises(ValueError, match=r"task 3 is outside 1\.\.2"):
            packed(tokens, task=3)
