"""Where a multimodal general model ranks cold items, and what their feature neighbours would give
them (issue 17). Trains one model of a cold-start suite under one seed (early stopping, best
epoch), then, on the test set:

* Recall@20 on warm and on cold targets as RecBole's evaluator gives it (``evaluate_warm_cold``)
  and as this script recomputes it from the scores (a check that the rest is computed right);
* the median rank of warm and of cold targets among the items RecBole ranks (masked: the user's
  training and validation items and test items of the other group, but not the targets), and the spread (std) of the scores over warm and over
  cold items (1,024 users drawn under seed 0): whether the content part of a score separates cold items at all;
* Recall@20 when each cold item's final embedding is replaced by the mean of its ``k`` nearest
  warm items' (cosine of the item features, every modality L2-normalised and concatenated): the
  plainest way to score a new item from its content alone, which ``cold_item_neighbours: k`` makes
  the models' own evaluation (:mod:`recbole_mm.model.layers.cold_items`); for a model that has that
  option, RecBole's own validation and test metrics with it at ``k`` = 0 (off) and each ``--k``,
  overall and on warm and cold targets, so that ``k`` can be chosen on the validation set;
* for a model with an ``item_embedding`` table, Recall@20 with the cold items' rows of that table
  set to zero before the final embeddings are computed: what the ID rows of items in no training
  pair carry (nothing in an ID-only model; in MGCN and MambaRec they train as neighbours in the
  warm items' kNN-graph views).

For the models whose score is ``users @ items.T`` over ``final_embeddings()`` (MambaRec, MGCN,
FREEDOM, VBPR).

    RECBOLE_MM_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/cold_start_probe.py \\
        --suite benchmarks/suites/cold-start-tiktok.yaml --model MGCN --out DIR [--seed 2020] [--k 1 5 10] \\
        [--checkpoint saved/MGCN-....pth]

``--checkpoint`` skips the training and probes that checkpoint's weights instead: one a probe kept, or
a benchmark run's best checkpoint copied from ``<out>/checkpoints/`` before the harness deletes it
(the model must have been trained on the suite's split and cold items: the same suite and seed).

Writes ``<out>/<suite>-<model>-seed<seed>-probe.csv`` and ``.md``, and keeps the trained model's
checkpoint in ``<out>/checkpoints/``.
"""

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

TOPK = 20
USER_BLOCK = 1024


def interaction_matrix(dataset, users: torch.Tensor, items: torch.Tensor) -> sp.csr_matrix:
    """Users x items, true at the given pairs."""
    return sp.csr_matrix((np.ones(len(users), dtype=bool), (users.numpy(), items.numpy())),
                         shape=(dataset.user_num, dataset.item_num))


def target_ranks(users_emb, items_emb, test_users, test_items, history) -> torch.Tensor:
    """Per test interaction, how many rankable items score above its target."""
    ranks = torch.empty(len(test_users), dtype=torch.long)
    order = torch.argsort(test_users)
    sorted_users = test_users[order]
    for start in range(0, int(sorted_users.max()) + 1, USER_BLOCK):
        rows = ((sorted_users >= start) & (sorted_users < start + USER_BLOCK)).nonzero().squeeze(1)
        if not len(rows):
            continue
        block = torch.arange(start, min(start + USER_BLOCK, users_emb.shape[0]))
        scores = users_emb[block] @ items_emb.T
        scores[torch.from_numpy(history[block.numpy()].toarray())] = -torch.inf
        scores[:, 0] = -torch.inf  # padding
        local = sorted_users[rows] - start
        target = scores[local, test_items[order[rows]]]
        ranks[order[rows]] = (scores[local] > target.unsqueeze(1)).sum(1)
    return ranks


def recall(ranks, users) -> float:
    """RecBole's Recall@20: per user, hits / targets, averaged over users."""
    hits = (ranks < TOPK).double()
    per_user = torch.bincount(users, weights=hits) / torch.bincount(users).clamp(min=1)
    return per_user[torch.unique(users)].mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--model", required=True, help="an entry label of the suite (its model name by default)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--checkpoint", help="probe this checkpoint's weights instead of training")
    args = parser.parse_args(argv)
    probe(args)
    return 0


def probe(args):
    """Train, measure, write the files; returns ``(RecBole's warm/cold report, rows of the table, rows of
    the cold_item_neighbours table)``."""
    from recbole_mm.benchmark.plan import build_config, load_suite, plan_runs
    from recbole_mm.data.cold_start import cold_targets, evaluate_warm_cold
    from recbole_mm.model.layers.cold_items import nearest_warm_items
    from recbole_mm.registry import get_trainer
    from recbole_mm.utils import build_data_and_model

    # the run as the benchmark harness plans it (the reference's protocol, the fixed split seed)
    suite = load_suite(args.suite)
    planned = next((r for r in plan_runs(suite) if r.label == args.model), None)
    if planned is None:
        raise SystemExit(f"{args.model} is not an entry of {args.suite}: {[e.label for e in suite.entries]}")
    run = dataclasses.replace(planned, seed=args.seed, config={
        **planned.config, "checkpoint_dir": str(Path(args.out, "checkpoints")), "show_progress": False})
    config = build_config(run)
    dataset, train, valid, test, model = build_data_and_model(config, split_seed=run.split_seed)
    if not hasattr(model, "final_embeddings"):
        raise SystemExit(f"{run.model} has no final_embeddings(): this probe needs a users @ items.T score")
    trainer = get_trainer(config["MODEL_TYPE"], run.model)(config, model)
    if args.checkpoint:
        trainer.saved_model_file = args.checkpoint
    else:
        trainer.fit(train, valid, saved=True, show_progress=False)
    report = evaluate_warm_cold(trainer, test, load_best_model=True)  # loads the best epoch's weights
    model.eval()
    with torch.no_grad():
        users_emb, items_emb = model.final_embeddings()

    cold = train.dataset.cold_items
    warm = torch.ones(dataset.item_num, dtype=torch.bool)
    warm[0], warm[cold] = False, False
    inter = test.dataset.inter_feat
    test_users, test_items = inter[dataset.uid_field], inter[dataset.iid_field]
    is_cold = cold_targets(test.dataset)

    # masked when ranking one group, as evaluate_warm_cold's loaders do: the user's training and
    # validation items and test items of the other group, except the group's own targets
    seen = torch.cat([p.dataset.inter_feat[dataset.uid_field] for p in (train, valid)]), \
        torch.cat([p.dataset.inter_feat[dataset.iid_field] for p in (train, valid)])
    masks = {}
    for name, group in (("warm", ~is_cold), ("cold", is_cold)):
        mask = interaction_matrix(dataset, torch.cat([seen[0], test_users[~group]]),
                                  torch.cat([seen[1], test_items[~group]])).astype(np.int8)
        own = interaction_matrix(dataset, test_users[group], test_items[group])
        masks[name] = (mask - mask.multiply(own)).astype(bool)

    rows = []
    def measure(variant, items):
        row = {"variant": variant}
        for name, group in (("warm", ~is_cold), ("cold", is_cold)):
            # a user's positives are a set (RecBole): a repeated target counts once
            pairs = torch.unique(test_users[group] * dataset.item_num + test_items[group])
            users, targets = pairs // dataset.item_num, pairs % dataset.item_num
            ranks = target_ranks(users_emb, items, users, targets, masks[name])
            row[f"{name}_recall@20"] = recall(ranks, users)
            row[f"{name}_median_rank"] = int(ranks.median())
        rows.append(row)

    measure("as trained", items_emb)
    for k in args.k:
        imputed = items_emb.clone()
        imputed[cold] = items_emb[nearest_warm_items(dataset, cold, warm, k)].mean(1)
        measure(f"cold items = mean of their {k} nearest warm items", imputed)
    if hasattr(model, "item_embedding"):
        table = model.item_embedding.weight
        kept = table.detach().clone()
        with torch.no_grad():
            table[cold] = 0.0
            _, zeroed = model.final_embeddings()
            table.copy_(kept)
        measure("cold items' ID embedding rows set to 0", zeroed)
    sample = torch.randperm(dataset.user_num - 1, generator=torch.Generator().manual_seed(0))[:USER_BLOCK] + 1
    scores = users_emb[sample] @ items_emb.T
    score_std = {"warm": scores[:, warm].std().item(), "cold": scores[:, cold].std().item()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{suite.name}-{args.model}-seed{args.seed}-probe".replace(" ", "_")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Cold-item probe: {args.model} on {suite.dataset} (seed {args.seed}, best epoch of early stopping)", "",
             f"{int(warm.sum())} warm and {len(cold)} cold items; test targets: {int((~is_cold).sum())} warm, "
             f"{int(is_cold.sum())} cold. RecBole's evaluator: warm Recall@20 {report['warm']['recall@20']}, "
             f"cold Recall@20 {report['cold']['recall@20']}. Std of the user-item scores over warm items "
             f"{score_std['warm']:.4f}, over cold items {score_std['cold']:.4f}.", "",
             "| variant | warm Recall@20 | cold Recall@20 | warm target median rank | cold target median rank |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['warm_recall@20']:.4f} | {r['cold_recall@20']:.4f} | {r['warm_median_rank']} | "
              f"{r['cold_median_rank']} |" for r in rows]
    options = option_rows(trainer, model, train, valid, test, args.k) if hasattr(model, "cold_neighbours") else []
    if options:
        names = list(options[0])[1:]
        lines += ["", "`cold_item_neighbours: k` through RecBole's evaluator (valid: overall; test: overall, warm and "
                  "cold targets):", "", "| k | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {r['k']} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |" for r in options]
        with open(stem.parent / f"{stem.name}-neighbours.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(options[0]))
            writer.writeheader()
            writer.writerows(options)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report, rows, options


def option_rows(trainer, model, train, valid, test, ks):
    """RecBole's metrics with ``cold_item_neighbours`` at 0 and at each of ``ks`` (same weights)."""
    from recbole_mm.data.cold_start import evaluate_warm_cold

    rows = []
    for k in [0, *ks]:
        model.init_cold_items({"cold_item_neighbours": k}, train.dataset)  # what the config key sets up
        model.clear_cache()
        at_k = [m for m in trainer.evaluate(valid, load_best_model=False, show_progress=False).items()
                if m[0].endswith(f"@{TOPK}")]  # e.g. recall@20, ndcg@20
        row = {"k": k, **{f"valid_{m}": v for m, v in at_k[:1]}}
        for group, result in [("test", trainer.evaluate(test, load_best_model=False, show_progress=False)),
                              *evaluate_warm_cold(trainer, test).items()]:
            row.update({f"{group}_{m}": v for m, v in result.items() if m.endswith(f"@{TOPK}")})
        rows.append(row)
    model.init_cold_items({"cold_item_neighbours": 0}, train.dataset)
    model.clear_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
