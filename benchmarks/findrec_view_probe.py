"""Does a trained FindRec still use its modality streams? A probe of saved checkpoints.

IICM can lower its alignment loss by making every modality view z_m the same vector (docs/design.md
§findrec): the views then carry nothing about the sequence, and FindRec is its ID stream alone.
For each checkpoint this script measures, on one training batch (eval mode), the views' mean norm,
their spread after L2 normalisation (median pairwise distance within a view; ~1.4 for unrelated
directions, 0 when every row points the same way) and the norm of their mean direction (1 = one
direction), for the checkpoint and for the same model at initialisation; then the validation metric
as trained and with every modality stream's output (all positions: the views, the cross-attention's
keys) replaced by its mean over the batch's real positions, i.e. with no per-sequence information
from the modalities. Equal metrics: the modality streams are not used.

The harness deletes a run's checkpoints once its row is written; copy ``<out>/checkpoints/<run>/*.pth``
while the run trains (its best epoch's file), or save one with ``run_recbole_mm.py``.

    RECBOLE_MM_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/findrec_view_probe.py \\
        CHECKPOINT.pth [CHECKPOINT.pth ...] [--label NAME ...] [--report FILE.md]
"""

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

from recbole.utils import init_seed  # noqa: E402

from recbole_mm.model.loss.kernels import median_bandwidth  # noqa: E402


@contextlib.contextmanager
def flattened_streams(model):
    """Inside the block, each modality stream's states and last states are their mean over the
    batch's real positions / rows: the same vector for every sequence."""
    streams = model._streams

    def flat(item_seq, packing):
        z_id, views, posteriors, states, masks = streams(item_seq, packing)
        states = [s.new_zeros(s.shape) + s[packing.mask].mean(0) for s in states]
        views = [v.new_zeros(v.shape) + v.mean(0) for v in views]
        return z_id, views, posteriors, states, masks

    model._streams = flat
    try:
        yield model
    finally:
        del model._streams  # back to the class's method


def view_stats(views: List[torch.Tensor]) -> Dict[str, float]:
    """Mean norm, spread of the L2-normalised rows and norm of their mean direction, averaged over the views."""
    units = [F.normalize(v, dim=-1) for v in views]
    return {"norm": sum(v.norm(dim=-1).mean().item() for v in views) / len(views),
            "spread": sum(median_bandwidth(u).item() for u in units) / len(units),
            "direction": sum(u.mean(0).norm().item() for u in units) / len(units)}


def _batch_views(model, batch) -> List[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model._encode(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])[1]


def probe(checkpoint: str) -> Dict[str, float]:
    """One checkpoint's row: view statistics (trained, ``init_``) and the validation metric as
    trained and with the modality streams flattened."""
    from recbole_mm.quick_start import load_data_and_model
    from recbole_mm.registry import get_trainer

    config, model, _, train_data, valid_data, _ = load_data_and_model(checkpoint)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    metric = config["valid_metric"].lower()
    batch = next(iter(train_data))
    batch = batch[0] if isinstance(batch, tuple) else batch
    row = {"metric": metric, **view_stats(_batch_views(model, batch))}
    row["valid"] = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)[metric]
    with flattened_streams(model):
        row["valid_flat"] = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)[metric]
    init_seed(config["seed"], config["reproducibility"])
    model.load_state_dict(type(model)(config, train_data.dataset).state_dict())
    row.update({f"init_{k}": v for k, v in view_stats(_batch_views(model, batch)).items()})
    return row


def report(labels: List[str], rows: List[Dict[str, float]]) -> str:
    metric = rows[0]["metric"] if rows else "valid metric"
    lines = [f"| checkpoint | view norm (init) | spread (init) | mean direction (init) | valid {metric} | "
             f"streams flattened | change |", "|---|---|---|---|---|---|---|"]
    for label, r in zip(labels, rows):
        lines.append(f"| {label} | {r['norm']:.3g} ({r['init_norm']:.3g}) | {r['spread']:.3g} ({r['init_spread']:.3g}) | "
                     f"{r['direction']:.3f} ({r['init_direction']:.3f}) | {r['valid']:.4f} | {r['valid_flat']:.4f} | "
                     f"{(r['valid_flat'] / r['valid'] - 1) * 100:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--label", nargs="*", help="one name per checkpoint (default: the file names)")
    parser.add_argument("--report", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    labels = args.label or [Path(c).name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        parser.error(f"{len(labels)} labels for {len(args.checkpoints)} checkpoints")
    table = report(labels, [probe(c) for c in args.checkpoints])
    print(table)
    if args.report:
        Path(args.report).write_text(table)


if __name__ == "__main__":
    main()
