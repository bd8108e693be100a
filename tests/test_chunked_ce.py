"""Chunked cross-entropy (recbole_mm/trainer/chunked_ce.py): RecBole's CE loss and gradients
without [batch, n_items] logits, swapped in only for models whose loss it reproduces."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, load_benchmark_script
from recbole_mm import Config
from recbole_mm.quick_start.quick_start import build_data_and_model
from recbole_mm.registry import get_trainer
from recbole_mm.model.loss.chunked_ce import ExcludingCrossEntropy, chunked_cross_entropy
from recbole_mm.trainer.scale import with_scale_hooks


@pytest.mark.parametrize("chunk", [1, 7, 50, 64])
def test_loss_and_gradients_equal_full_cross_entropy(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(50, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (9,), generator=gen)
    target[1] = target[0]  # a repeated target: its table row gets two contributions
    full = F.cross_entropy(hidden @ table.T, target)
    expected = torch.autograd.grad(full, (hidden, table))
    ours = chunked_cross_entropy(hidden, table, target, chunk)
    got = torch.autograd.grad(ours * 1.0, (hidden, table))
    assert torch.allclose(ours, full, rtol=1e-12)
    assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-12) for g, e in zip(got, expected))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_excluded_items_leave_the_softmax_in_both_forms(chunk):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(50, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 25, (9,), generator=gen)
    excluded = torch.zeros(50, dtype=torch.bool)
    excluded[25::3] = True  # never a target
    # by hand: the softmax over the kept items only
    logits = hidden @ table.T
    kept = ~excluded
    expected = (torch.logsumexp(logits[:, kept], 1) - logits[torch.arange(9), target]).mean()
    expected_grads = torch.autograd.grad(expected, (hidden, table))
    whole = ExcludingCrossEntropy(torch.nn.CrossEntropyLoss(), excluded)(hidden @ table.T, target)
    sliced = chunked_cross_entropy(hidden, table, target, chunk, excluded)
    for value in (whole, sliced):
        assert torch.allclose(value, expected, rtol=1e-12)
        grads = torch.autograd.grad(value, (hidden, table))
        assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-12) for g, e in zip(grads, expected_grads))
        assert (grads[1][excluded] == 0).all() and (grads[1][kept].abs().sum(1) > 0).any()
    assert not torch.allclose(whole, F.cross_entropy(hidden @ table.T, target))
    with pytest.raises(ValueError, match="logits over 49 items"):
        ExcludingCrossEntropy(torch.nn.CrossEntropyLoss(), excluded)(logits[:, :49], target)


SEQ = {"train_neg_sample_args": None, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}}


def _fit(model, planted, chunk):
    root, name = planted
    cfg = {**TINY, **SEQ, "data_path": root, "modalities": None, "ce_item_chunk": chunk}
    config = Config(model=model, dataset=name, config_dict=cfg)
    _, train_data, _, _, net = build_data_and_model(config)
    trainer = with_scale_hooks(get_trainer(config["MODEL_TYPE"], model))(config, net)
    trainer.fit(train_data, saved=False)
    return net


def test_sasrec_trains_on_chunks_to_the_same_weights(planted):
    plain, chunked = _fit("SASRec", planted, None), _fit("SASRec", planted, 16)
    assert "calculate_loss" not in vars(plain) and "calculate_loss" in vars(chunked)
    for (name, a), (_, b) in zip(plain.state_dict().items(), chunked.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_a_model_with_another_loss_keeps_it(planted, caplog):
    with caplog.at_level(logging.WARNING):
        net = _fit("BERT4Rec", planted, 16)
    assert "calculate_loss" not in vars(net)
    assert "keeps its own loss" in caplog.text


@pytest.mark.parametrize("chunk", [0, 100])
def test_scale_benchmark_times_training_steps_on_the_loss_fit_would_use(tmp_path, chunk):
    """benchmarks/scale_eval.py --train-steps: the steps train (weights move) on the sliced loss
    exactly when ce_item_chunk is set, and the row says which."""
    script = load_benchmark_script("scale_eval")
    data = script.make_data(tmp_path / "data", users=60, items=400, per_user=6)
    args = SimpleNamespace(data=str(data), model="SASRec", path="blocked", dim=16, eval_batch_size=4096,
                           item_block=128, features=0, train_steps=2, train_batch_size=64, ce_item_chunk=chunk)
    moved = []
    step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        before = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        result = step(self, *a, **k)
        after = [p.detach() for group in self.param_groups for p in group["params"]]
        moved.append(any(not torch.equal(x, y) for x, y in zip(before, after)))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", recording_step)
        row = script.run_one(args)
    assert row["status"] == "ok" and row["train_batch_size"] == 64 and row["ce_item_chunk"] == chunk
    assert row["train_s_per_step"] > 0 and row["train_peak_extra_mb"] >= 0
    assert moved == [True] * 3  # the untimed first step and the two timed ones
