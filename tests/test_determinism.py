"""Training on several CPU threads repeats itself: one batch gives bit-identical gradients at every
call, at two threads as at one (docs/design.md §threads). Sizes are large enough that torch
splits the gathers' work between the threads (a tensor under ~32k elements runs on one)."""

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from conftest import planted_paths, torch_threads
from recbole_mm.model.layers.gather import gather_rows


def test_gather_rows_is_indexing_with_a_backward_that_repeats():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 64, generator=g, requires_grad=True)
    index = torch.randint(0, 500, (300, 40), generator=g)  # each row about 24 times
    weight = torch.randn(300, 40, 64, generator=g)
    with torch_threads(2):
        grads = [torch.autograd.grad((gather_rows(table, index) * weight).sum(), table)[0] for _ in range(5)]
        reference = torch.autograd.grad((table[index] * weight).sum(), table)[0]
    assert torch.equal(gather_rows(table, index), table[index])
    torch.testing.assert_close(grads[0], reference)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


COMMON = {"modalities": ["image", "text"], "embedding_size": 64, "show_progress": False, "state": "WARNING",
          "seed": 2025}
GENERAL = {**COMMON, "train_batch_size": 2048, "knn_k": 5, "reduction_ratio": 2,
           "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}}
SEQUENTIAL = {**COMMON, "train_batch_size": 512, "MAX_ITEM_LIST_LENGTH": 10, "align_dim": 64, "n_layers": 1,
              "n_heads": 2, "n_experts": 2, "d_state": 4, "hidden_size": 64, "inner_size": 64,
              "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}}
OVER_MM = {"id_input": "summed", "feature_logits": True, "output_head": "residual"}  # the preset's form


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return planted_paths(tmp_path_factory.mktemp("determinism"))


@pytest.mark.parametrize("model, base, overrides", [
    ("FindRec", SEQUENTIAL, {}), ("FindRec", SEQUENTIAL, OVER_MM), ("Mamba4Rec", SEQUENTIAL, {}),
    ("Mamba4RecMM", SEQUENTIAL, {}), ("SASRecMM", SEQUENTIAL, {}), ("MMMLP", SEQUENTIAL, {}),
    ("MGCN", GENERAL, {}), ("MambaRec", GENERAL, {}), ("FREEDOM", GENERAL, {}), ("VBPR", GENERAL, {}),
], ids=["FindRec", "FindRec-over-MM", "Mamba4Rec", "Mamba4RecMM", "SASRecMM", "MMMLP", "MGCN", "MambaRec",
        "FREEDOM", "VBPR"])
def test_a_batch_gives_the_same_gradients_at_every_call_on_two_threads(data, model, base, overrides):
    from recbole_mm.config import Config
    from recbole_mm.registry import create_dataset, get_model

    config = Config(model=model, dataset="planted", config_dict={**base, **data, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    net = get_model(model)(config, train._dataset)
    batch = next(iter(train))
    batch = batch[0] if isinstance(batch, tuple) else batch

    def gradients():
        net.zero_grad()
        torch.manual_seed(0)  # the same dropout masks every call
        loss = net.calculate_loss(batch)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    with torch_threads(2):
        first, *others = [gradients() for _ in range(3)]
    for name, grad in first.items():
        assert all(torch.equal(grad, other[name]) for other in others), f"{model}: d{name} changes from call to call"
