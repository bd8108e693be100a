"""``python -m recbole_mm.prepare``: the command line of :mod:`recbole_mm.prepare`."""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from recbole_mm.data.dataset import check_feature_array, unique_item_index
from recbole_mm.data.features import DEFAULT_TEXT_ENCODER, cached_text_features, read_atomic_columns
from recbole_mm.data.locate import find_dataset
from recbole_mm.prepare.atomic import refuse_existing, refuse_overwriting_source, replace_files
from recbole_mm.prepare.images import (NORMALIZATION, encode_item_images, find_images,
                                       load_image_encoder)
from recbole_mm.prepare.importers import read_amazon, read_mmrec
from recbole_mm.prepare.tables import ITEM, check_tables, dataset_stats, format_stats, load_tables, write_tables


def _item_tokens(dataset: Path):
    """Item tokens of ``<dataset>/<name>.item`` in row order, checked for duplicates."""
    item_file = dataset / f"{dataset.name}.item"
    if not item_file.is_file():
        raise FileNotFoundError(f"{item_file}: missing; features are computed per data row of the dataset's .item file")
    return item_file, unique_item_index(read_atomic_columns(item_file, [ITEM])[ITEM], item_file)


def cmd_mmrec(args) -> None:
    refuse_overwriting_source(args.out / (args.name or args.src.name), args.src)
    tables = read_mmrec(args.src, args.name or args.src.name)
    target = args.out / tables.name
    write_tables(tables, target, args.force)
    print(f"wrote {target}\n{format_stats(dataset_stats(tables))}")


def cmd_amazon(args) -> None:
    refuse_overwriting_source(args.out / (args.name or args.src.name), args.src)
    tables, undescribed = read_amazon(args.src, args.name or args.src.name, args.user_k, args.item_k)
    target = args.out / tables.name
    write_tables(tables, target, args.force)
    print(f"dropped {undescribed:,} interactions on items without a .item row; "
          f"{args.user_k}/{args.item_k}-core (user/item) kept {len(tables.inter):,}")
    print(f"wrote {target}\n{format_stats(dataset_stats(tables))}")


def cmd_text(args) -> None:
    item_file, tokens = _item_tokens(args.dataset)
    out_file = (args.out or args.dataset) / f"{args.modality}_feat.npy"
    # A file with our cache sidecar is refreshed when its texts changed; any other file (shipped
    # features) is only replaced on request.
    if not out_file.with_suffix(".json").is_file():
        refuse_existing(out_file, args.force)
    cached_text_features(item_file, args.fields, out_file, args.encoder, joiner=args.joiner,
                         batch_size=args.batch_size)
    print(f"{out_file}: text features for {len(tokens):,} items (cache record {out_file.with_suffix('.json').name})")


def cmd_images(args) -> None:
    item_file, tokens = _item_tokens(args.dataset)
    out = args.out or args.dataset
    feat_file, mask_file = out / f"{args.modality}_feat.npy", out / f"{args.modality}_mask.npy"
    for path in (feat_file, mask_file):
        refuse_existing(path, args.force)
    model = load_image_encoder(args.weights, args.arch)
    feat, mask, unreadable = encode_item_images(list(tokens), find_images(args.images), model, args.size,
                                                args.normalize, args.batch_size)
    check_feature_array(feat, feat_file, len(tokens), item_file.name, args.modality)
    out.mkdir(parents=True, exist_ok=True)
    replace_files({feat_file: feat, mask_file: mask})
    print(f"{feat_file}: {feat.shape[1]}-d features for {int(mask.sum()):,}/{len(tokens):,} items "
          f"({len(unreadable)} unreadable images); {mask_file.name} marks the items without one")


def cmd_stats(args) -> None:
    folder = args.dataset if args.dataset.is_dir() else find_dataset(str(args.dataset))
    tables = load_tables(folder)
    check_tables(tables, folder, args.missing_tolerance)
    stats = dataset_stats(tables)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.prepare",
                                     description="Prepare multimodal datasets in recbole-mm's format.")
    sub = parser.add_subparsers(dest="command", required=True)

    def importer(name, help_text, src_help, run):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", type=Path, help=src_help)
        p.add_argument("--out", type=Path, required=True, help="data root; the dataset goes to OUT/<name>/")
        p.add_argument("--name", help="dataset name (default: the source folder's name)")
        p.add_argument("--force", action="store_true", help="replace an existing OUT/<name>/")
        p.set_defaults(run=run)
        return p

    importer("mmrec", "convert an MMRec dataset folder (<ds>.inter + <m>_feat.npy)", "MMRec dataset folder <ds>/",
             cmd_mmrec)
    p = importer("amazon", "k-core of RecBole's Amazon atomic files (<ds>.inter + <ds>.item)",
                 "folder <ds>/ with <ds>.inter and <ds>.item", cmd_amazon)
    p.add_argument("--user-k", type=int, default=5, help="minimum interactions per user (default 5)")
    p.add_argument("--item-k", type=int, default=5, help="minimum interactions per item (default 5)")

    p = sub.add_parser("text", help="<m>_feat.npy from text fields of .item (sentence-transformers)")
    p.add_argument("dataset", type=Path, help="dataset folder <ds>/ holding <ds>.item")
    p.add_argument("--fields", nargs="+", required=True,
                   help="fields of .item, in order; NAME:list reads a token_seq of names (Skin_Care Face -> "
                        "'Skin Care, Face')")
    p.add_argument("--joiner", default=", ", help="text between the non-empty fields (default ', ')")
    p.add_argument("--modality", default="text", help="writes <modality>_feat.npy (default text)")
    p.add_argument("--encoder", default=DEFAULT_TEXT_ENCODER,
                   help="sentence-transformers model: local path or hub name "
                        f"(default {DEFAULT_TEXT_ENCODER}, offline)")
    _output_args(p, batch_size=64, force="replace a feature file that is not our cache")
    p.set_defaults(run=cmd_text)

    p = sub.add_parser("images", help="<m>_feat.npy + <m>_mask.npy from a folder of item images")
    p.add_argument("dataset", type=Path, help="dataset folder <ds>/ holding <ds>.item")
    p.add_argument("--images", type=Path, required=True, help="folder of images named <item token>.<jpg|png|...>")
    p.add_argument("--weights", help="local TorchScript file, or torchvision state_dict with --arch")
    p.add_argument("--arch", help="torchvision architecture of a state_dict (e.g. resnet50)")
    p.add_argument("--normalize", choices=sorted(NORMALIZATION), default="imagenet",
                   help="mean/std of the model's training (default imagenet; clip for CLIP)")
    p.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--modality", default="image", help="writes <modality>_feat.npy (default image)")
    _output_args(p, batch_size=32, force="replace existing feature/mask files")
    p.set_defaults(run=cmd_images)

    p = sub.add_parser("stats", help="check a dataset folder and print its statistics")
    p.add_argument("dataset", type=Path, help="dataset folder <ds>/, or a dataset name looked up as --dataset is")
    p.add_argument("--missing-tolerance", type=float, default=0.0,
                   help="share of .inter items allowed without a .item row (the loader's feature_missing_tolerance)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(run=cmd_stats)
    return parser


def _output_args(p, batch_size: int, force: str) -> None:
    """The options every feature encoder takes: its batch, where the files go, overwriting."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--out", type=Path, help="output folder (default: the dataset folder)")
    p.add_argument("--force", action="store_true", help=force)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as err:  # bad input: say what and where, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
