"""``--quick``: a smoke test of the benchmark harness, not of the models.

Every run gets the same tiny settings (:data:`QUICK_CONFIG`: small dimensions, one epoch) and
the same slice of the data: the interactions of the first ``n_users`` users of ``<ds>.inter``
(file order), written to ``<out>/quick-data/<ds>/``; one seed unless ``--seeds`` says otherwise.
It checks that every model of a suite loads, trains, is evaluated on the shared split and lands
in ``results.csv`` and the summary. Its metrics mean nothing: one epoch of a tiny model on a
few hundred users ranks the whole catalogue at chance level, and often scores 0. Each run still
pays for starting a process and loading the dataset's items and features: on TikTok, a shared
2-core CPU took about a minute for ``--models BPR MambaRec --quick`` (see the README).

The other files of the dataset folder (``.item``, ``.user``, feature files) are linked unchanged,
so feature rows still match ``.item`` and the dataset's YAML defaults still apply.
"""

from pathlib import Path

#: tiny dimensions and one epoch; keys a model does not have are ignored by it
QUICK_CONFIG = {
    "epochs": 1, "embedding_size": 16, "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
    "align_dim": 16, "train_batch_size": 256, "eval_batch_size": 4096, "show_progress": False,
}


def first_users_slice(source: Path, target_root: Path, n_users: int, user_field: str = "user_id") -> Path:
    """Write ``target_root/<name>/`` holding the first ``n_users`` users' interactions of the
    dataset folder ``source`` (named ``<name>``); returns ``target_root``."""
    source, name = Path(source), Path(source).name
    target = Path(target_root) / name
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        link = target / file.name
        if file.is_file() and file.name != f"{name}.inter" and not link.exists():
            link.symlink_to(file.resolve())
    with open(source / f"{name}.inter") as src, open(target / f"{name}.inter", "w") as dst:
        header = src.readline()
        fields = [column.split(":")[0] for column in header.rstrip("\n").split("\t")]
        if user_field not in fields:
            raise ValueError(f"{source / (name + '.inter')}: quick mode slices by the `{user_field}` "
                             f"column, which is not among {fields}")
        column, kept = fields.index(user_field), set()
        dst.write(header)
        for line in src:
            user = line.split("\t")[column]
            if user not in kept and len(kept) == n_users:
                continue
            kept.add(user)
            dst.write(line)
    return Path(target_root)
