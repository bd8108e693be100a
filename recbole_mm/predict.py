"""Top-k recommendations from a saved checkpoint, in a process of its own (issue 17).

::

    python -m recbole_mm.predict saved/BPR-Dec-01-2026_05-00-00.pth --users 196 186 --topk 10
    python -m recbole_mm.predict saved/SASRec-....pth --sequence 242 302 377 --topk 10
    python -m recbole_mm.predict saved/BPR-....pth --input users.txt --output top10.csv

Users and items are the dataset's own tokens, in and out. ``--users`` ranks for users of the
dataset (a sequential model reads each user's interactions of the whole dataset, in time order,
as the sequence); ``--sequence`` ranks the next item after the given items (sequential models
only). ``--input FILE`` takes one query per line (a user token; or, with ``--sequences``, a
sequence of item tokens separated by spaces). The answer is CSV with one row per query:
``query,item_1,...,item_k`` (best first), on standard output or into ``--output``. Items the
user (or the sequence) already holds are never recommended unless ``--include-seen``; padding
never is. Where fewer than k items are left to recommend, a row holds only those.

The ranking is :mod:`recbole_mm.evaluation.topk`'s exact blocked top-k, so a catalogue of any
size fits in memory. The checkpoint's dataset is loaded and split as at training time (graph
models build their graph from the training split), through
:func:`recbole_mm.quick_start.load_data_and_model`.
"""

import argparse
import csv
import sys
from typing import List, Sequence

import torch
from recbole.data.interaction import Interaction
from recbole.utils import ModelType

import recbole_mm  # noqa: F401  (compat fixes and registration before a checkpoint is unpickled)
from recbole_mm.evaluation.scorers import make_scorer
from recbole_mm.evaluation.topk import CHECK_USERS, blocked_topk
from recbole_mm.quick_start import load_data_and_model


class Predictor:
    """A trained model and its dataset, ranking all items for users or item sequences."""

    def __init__(self, config, model, dataset):
        self.config, self.model, self.dataset = config, model.eval(), dataset
        self.uid, self.iid = dataset.uid_field, dataset.iid_field
        self.n_items = dataset.item_num
        self.sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL

    @classmethod
    def from_checkpoint(cls, model_file: str) -> "Predictor":
        config, model, dataset, *_ = load_data_and_model(model_file)
        return cls(config, model, dataset)

    # ----------------------------------------------------------------- token mapping
    def _ids(self, field: str, tokens: Sequence[str]) -> torch.Tensor:
        known = self.dataset.field2token_id[field]
        unknown = [t for t in tokens if t not in known]
        if unknown:
            raise ValueError(f"unknown {field} token(s) {unknown[:10]}: not in the checkpoint's dataset "
                             f"'{self.config['dataset']}'")
        return torch.tensor([known[t] for t in tokens], dtype=torch.long)

    def _user_items(self, users: torch.Tensor):
        """``(sequence, seen)`` per user: the items in time order (a sequential model's input; its
        dataset is augmented, one row per target with the items before it) and the set of all."""
        inter = self.dataset.inter_feat
        order = torch.argsort(inter[self.uid], stable=True)  # grouped by user, time order kept within
        grouped = inter[self.uid][order]
        starts, ends = torch.searchsorted(grouped, users), torch.searchsorted(grouped, users, right=True)
        sequences, seen = [], []
        for u, start, end in zip(users.tolist(), starts.tolist(), ends.tolist()):
            rows = order[start:end]
            if self.sequential and not len(rows):
                raise ValueError(f"user {self.dataset.id2token(self.uid, u)} has no interactions to continue")
            if self.sequential:  # rows are in time order; the first holds the first item in its list
                first, last = rows[0], rows[-1]
                lists, lengths = inter[self.model.ITEM_SEQ], inter[self.model.ITEM_SEQ_LEN]
                sequences.append(torch.cat([lists[last, :lengths[last]], inter[self.iid][last:last + 1]]))
                seen.append(torch.cat([lists[first, :lengths[first]], inter[self.iid][rows]]))
            else:
                seen.append(inter[self.iid][rows])
        return sequences, seen

    # ----------------------------------------------------------------- ranking
    def _rank(self, interaction: Interaction, seen: List[torch.Tensor], k: int, include_seen: bool):
        """Top-``k`` item tokens per row of ``interaction``, ``eval_batch_size`` rows at a time."""
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        device, chunk = self.config["device"], int(self.config["eval_batch_size"])
        block = int(self.config["eval_item_block"] or self.n_items)
        top, scorer = [], None
        with torch.no_grad():
            for lo in range(0, len(interaction), chunk):
                part, part_seen = interaction[lo:lo + chunk].to(device), seen[lo:lo + chunk]
                history = None
                if not include_seen:
                    rows = torch.cat([torch.full_like(s, r) for r, s in enumerate(part_seen)])
                    history = (rows.to(device), torch.cat(part_seen).to(device))
                if scorer is None:
                    scorer = make_scorer(self.model, part[:CHECK_USERS], self.n_items)
                top.append(blocked_topk(scorer, part, history, self.n_items, k, block, chunk * block).cpu())
        # masked items (padding, and the seen ones unless asked for) rank last, so they enter a row
        # only where fewer than k items are left to recommend: dropped, that row is shorter than k
        rows = []
        for r, ids in enumerate(torch.cat(top)):
            keep = ids != 0
            if not include_seen:
                keep &= ~torch.isin(ids, seen[r])
            rows.append(list(self.dataset.id2token(self.iid, ids[keep].numpy())))
        return rows

    def recommend_users(self, users: Sequence[str], k: int = 10, include_seen: bool = False):
        """Top-``k`` item tokens for each user token."""
        ids = self._ids(self.uid, list(users))
        sequences, seen = self._user_items(ids)
        if self.sequential:
            return self._rank(self._sequences(sequences, ids), seen, k, include_seen)
        return self._rank(Interaction({self.uid: ids}), seen, k, include_seen)

    def recommend_sequences(self, sequences: Sequence[Sequence[str]], k: int = 10, include_seen: bool = False):
        """Top-``k`` next item tokens after each sequence of item tokens (sequential models)."""
        if not self.sequential:
            raise ValueError(f"{self.config['model']} is a general model: --sequence needs a sequential one; "
                             "rank for --users instead")
        seen = [self._ids(self.iid, list(seq)) for seq in sequences]
        if any(len(s) == 0 for s in seen):
            raise ValueError("an empty sequence has nothing to continue")
        return self._rank(self._sequences(seen), seen, k, include_seen)

    def _sequences(self, items: List[torch.Tensor], users: torch.Tensor = None) -> Interaction:
        """RecBole's sequence fields: the last ``MAX_ITEM_LIST_LENGTH`` items, left-aligned, 0-padded."""
        max_len = int(self.config["MAX_ITEM_LIST_LENGTH"])
        seq = torch.zeros(len(items), max_len, dtype=torch.long)
        lengths = torch.tensor([min(len(s), max_len) for s in items], dtype=torch.long)
        for row, s in enumerate(items):
            seq[row, :lengths[row]] = s[-max_len:]
        fields = {self.model.ITEM_SEQ: seq, self.model.ITEM_SEQ_LEN: lengths}
        fields[self.uid] = users if users is not None else torch.zeros(len(items), dtype=torch.long)
        return Interaction(fields)


def _parser():
    p = argparse.ArgumentParser(prog="python -m recbole_mm.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pth file saved by RecBole's trainer (saved/<Model>-<time>.pth)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--users", nargs="+", metavar="USER", help="user tokens of the dataset")
    query.add_argument("--sequence", nargs="+", metavar="ITEM", help="item tokens, oldest first (sequential models)")
    query.add_argument("--input", metavar="FILE", help="one query per line: a user token, or with --sequences a "
                                                       "space-separated item sequence")
    p.add_argument("--sequences", action="store_true", help="--input lines are item sequences, not users")
    p.add_argument("--topk", type=int, default=10, help="items per query (default 10)")
    p.add_argument("--include-seen", action="store_true", help="also recommend items the user/sequence holds")
    p.add_argument("--output", metavar="CSV", help="write the CSV here instead of standard output")
    return p


def _answer(args):
    """The queries' keys (as the CSV shows them) and their top-k item tokens."""
    predictor = Predictor.from_checkpoint(args.checkpoint)
    if args.input:
        with open(args.input) as f:
            lines = [line.strip() for line in f if line.strip()]
        queries = [line.split() for line in lines] if args.sequences else lines
    else:
        queries = [args.sequence] if args.sequence else args.users
    if args.sequence or args.sequences:
        return [" ".join(q) for q in queries], predictor.recommend_sequences(queries, args.topk, args.include_seen)
    return queries, predictor.recommend_users(queries, args.topk, args.include_seen)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.sequences and not args.input:
        parser.error("--sequences says how to read --input's lines; use --sequence ITEM ... on the command line")
    try:
        keys, top = _answer(args)
    except (ValueError, OSError) as err:  # bad input: say what, without a traceback (as recbole_mm.prepare)
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(["query"] + [f"item_{r + 1}" for r in range(args.topk)])
        writer.writerows([key, *items] for key, items in zip(keys, top))
    finally:
        if args.output:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
