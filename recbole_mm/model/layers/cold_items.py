"""Items with no training interaction (cold items), scored through their feature neighbours.

A general model's final item embedding comes from what the item was trained on: its ID embedding,
its edges in the user-item graph and, in the multimodal models, what its kNN neighbours' views
carry back to it. A cold item has no edges and no pair of its own, so its embedding is weak: with
20% of the items cold, the multimodal graph models rank almost no cold item into a top 20 on TikTok
or Amazon Beauty (docs/results/cold-start-tiktok.md, cold-start-beauty.md). The plainest
content-based fallback gives a cold item the mean final embedding of its ``k`` most
feature-similar warm items, so it is ranked where items like it are (docs/design.md, §data).

Similarity is the cosine of the item features as the dataset gives them: every modality's rows
L2-normalised, concatenated, normalised again (a modality an item lacks contributes zeros), the
same for every model whatever its own ``feature_norm``.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

#: cold items compared with all candidates per block (bounds the [block, n_items] similarity matrix)
BLOCK = 4096


def untrained_items(dataset) -> torch.Tensor:
    """``bool [item_num]``: the items with no interaction in ``dataset`` (a training split); the
    padding id 0 is not counted."""
    items = torch.as_tensor(dataset.inter_feat[dataset.iid_field])
    untrained = torch.bincount(items, minlength=dataset.item_num) == 0
    untrained[0] = False
    return untrained


def feature_matrix(dataset) -> torch.Tensor:
    """``[item_num, sum_m D_m]``, the rows the similarity is the dot product of."""
    parts = [F.normalize(dataset.item_features[m].float(), dim=1) for m in sorted(dataset.item_features)]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def nearest_warm_items(dataset, items: torch.Tensor, warm: torch.Tensor, k: int) -> torch.Tensor:
    """``long [len(items), k]``: each of ``items``' ``k`` most feature-similar items among ``warm``
    (``bool [item_num]``), most similar first."""
    feats = feature_matrix(dataset)
    out = torch.empty(len(items), k, dtype=torch.long)
    for start in range(0, len(items), BLOCK):
        sim = feats[items[start:start + BLOCK]] @ feats.T
        sim[:, ~warm] = -torch.inf
        out[start:start + BLOCK] = sim.topk(k, dim=1).indices
    return out


def cold_item_neighbours(dataset, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cold, neighbours)``: the ids of ``dataset``'s untrained items and ``[len(cold), k]`` ids of
    their ``k`` nearest warm items (:func:`nearest_warm_items`)."""
    untrained = untrained_items(dataset)
    warm = ~untrained
    warm[0] = False
    cold = untrained.nonzero().squeeze(1)
    if int(warm.sum()) < k:
        raise ValueError(f"cold_item_neighbours {k} exceeds the {int(warm.sum())} items with training interactions")
    return cold, nearest_warm_items(dataset, cold, warm, k)
