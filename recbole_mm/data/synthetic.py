"""A planted-signal multimodal dataset for tests: small, deterministic by seed, learnable.

Items fall into ``n_clusters`` latent clusters. Each user prefers one cluster and walks through
its items in a fixed cyclic order (with probability ``noise`` a step jumps to a random item), so

* a general recommender can learn *which cluster* a user likes (user-item co-occurrence), and
* a sequential recommender can learn *which item comes next* (a planted successor per item);
* every modality's feature row is a random linear image of the item's cluster one-hot and its
  position in the cycle, plus Gaussian noise: the features carry the latent factors behind the
  choices, so content-aware models have a real signal to pick up.

A popularity ranking is weak on this data by construction (clusters are equally popular and the
walk visits a cluster's items evenly), so "beats popularity" means the model learned the plant.
"""

from pathlib import Path
from typing import Sequence

import numpy as np


def make_planted_dataset(root, name: str = "planted", n_users: int = 300, n_items: int = 120,
                         n_clusters: int = 6, seq_len: int = 12, modalities: Sequence[str] = ("image", "text"),
                         dims: Sequence[int] = (32, 24), noise: float = 0.1, feature_noise: float = 0.1,
                         x_label: bool = False, seed: int = 0) -> str:
    """Write ``<root>/<name>/{<name>.inter, <name>.item, <m>_feat.npy}`` and return ``str(root)``
    (ready for ``config_dict={'data_path': root, 'dataset': name}``).

    Item tokens are ``i1..iN`` written to ``.item`` in a shuffled order, so a loader that assumes
    "row = id - 1" fails the alignment tests. With ``x_label`` each user's last interaction is
    labelled 2 (test), the one before 1 (valid), the rest 0 (train).
    """
    if len(dims) != len(modalities):
        raise ValueError(f"dims {list(dims)} must give one dimension per modality {list(modalities)}")
    if n_items % n_clusters:
        raise ValueError(f"n_items ({n_items}) must be a multiple of n_clusters ({n_clusters})")
    rng = np.random.default_rng(seed)
    per_cluster = n_items // n_clusters
    cluster = np.repeat(np.arange(n_clusters), per_cluster)      # item -> cluster
    position = np.tile(np.arange(per_cluster), n_clusters)       # item -> place in its cycle
    successor = np.where(position == per_cluster - 1, np.arange(n_items) - per_cluster + 1, np.arange(n_items) + 1)

    users, items, stamps = [], [], []
    for u in range(n_users):
        pref = u % n_clusters
        item = pref * per_cluster + rng.integers(per_cluster)
        for t in range(seq_len):
            users.append(u)
            items.append(item)
            stamps.append(t)
            item = successor[item] if rng.random() > noise else rng.integers(n_items)

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float" + ("\tx_label:token" if x_label else "") + "\n")
        for k, (u, i, t) in enumerate(zip(users, items, stamps)):
            label = f"\t{2 if t == seq_len - 1 else 1 if t == seq_len - 2 else 0}" if x_label else ""
            f.write(f"u{u + 1}\ti{i + 1}\t1.0\t{1_000_000 + u * 1000 + t}{label}\n")

    order = rng.permutation(n_items)  # .item row r describes item order[r]
    with open(folder / f"{name}.item", "w") as f:
        f.write("item_id:token\tcluster:token\n")
        for i in order:
            f.write(f"i{i + 1}\tc{cluster[i]}\n")

    phase = 2 * np.pi * position / per_cluster
    latent = np.concatenate([np.eye(n_clusters)[cluster], np.stack([np.cos(phase), np.sin(phase)], 1)], 1)
    for modality, dim in zip(modalities, dims):
        proj = rng.normal(size=(latent.shape[1], dim))
        feat = latent @ proj + feature_noise * rng.normal(size=(n_items, dim))
        np.save(folder / f"{modality}_feat.npy", feat[order].astype(np.float32))
    return str(root)
