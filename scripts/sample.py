"""Write samples from a gantrain training checkpoint.

    python scripts/sample.py --checkpoint outputs/RUN/checkpoints/last.ckpt --num 64 --out grid.png
    python scripts/sample.py --checkpoint ... --num 16 --class 3 --out threes.png   # a conditional model's class 3

A thin front end to :mod:`gantrain.sampling`; user mistakes end as one ``sample.py: error: ...``
line on stderr with exit status 2, not a traceback. Any ``--num`` is sampled ``--batch-size`` at a
time; an existing output is replaced only with ``--force``, the input checkpoint never.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from gantrain.errors import GantrainError
from gantrain.sampling import class_cycle, existing_outputs, load_model, output_kind, sample_to
from gantrain.trainer import resolve_device


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Write samples from a gantrain training checkpoint. Only trust checkpoints you made: "
        "loading one runs pickled code.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint written by training, e.g. RUN_DIR/checkpoints/last.ckpt",
    )
    parser.add_argument("--num", type=int, required=True, metavar="N", help="number of samples (>= 1)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="*.pt: a float32 tensor in the data's own units, images (N, C, H, W) in [-1, 1] or 2-D "
        "mixture points (N, 2) in the mixture's coordinates; *.png: one grid image; any other "
        "path (including other suffixes such as .jpg) is a folder, created if needed, with "
        "000000.png, 000001.png, ... one per sample",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="latent noise seed: the same seed on the same device gives the same samples, across "
        "--batch-size values up to float rounding (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="B", help="samples decoded at once (>= 1; default: %(default)s)"
    )
    parser.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        metavar="K",
        help="a conditional checkpoint's class to sample (several: --class 3 5, taken in turn: 3, 5, 3, ...); "
        "default: every class in turn, sample i of class i %% num_classes. The noise does not depend on it",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file (or the numbered PNGs of an --out folder); never the --checkpoint",
    )
    parser.add_argument(
        "--no-ema",
        action="store_true",
        help="use the generator's raw trained weights even when the run kept an EMA of them (trainer.ema); "
        "by default the EMA weights are used, as in the run's sample grids",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="sample.py: warning: %(message)s")
    # Cheap checks first, so a typo fails before the checkpoint is loaded or anything is sampled.
    if args.num < 1:
        parser.error(f"--num={args.num}: must be >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size}: must be >= 1")
    out, checkpoint = Path(args.out), Path(args.checkpoint)
    if out.exists() and checkpoint.exists() and os.path.samefile(out, checkpoint):
        parser.error(f"--out: '{out}' is the input --checkpoint; write the samples to another path")
    try:
        output_kind(out)
        existing = existing_outputs(out, args.num)
    except GantrainError as e:
        parser.error(f"--out: {e}")
    if existing and not args.force:
        what = "exists" if existing == [out] else f"already holds {len(existing)} of its PNGs ({existing[0].name}, ...)"
        parser.error(f"--out: '{out}' {what}; pass --force to replace, or write to another path")
    try:
        device = resolve_device(args.device, key="--device")
    except GantrainError as e:
        parser.error(str(e))
    try:
        model = load_model(args.checkpoint, device, what="--checkpoint", ema=not args.no_ema)
    except GantrainError as e:
        parser.error(" ".join(str(e).split()))  # one line, even when a torch error inside spans several
    try:
        class_cycle(model, args.classes, what="--class")  # an unconditional model, a class out of range
    except GantrainError as e:
        parser.error(str(e))
    try:
        paths = sample_to(model, out, args.num, args.seed, device, args.batch_size, labels=args.classes)
    except GantrainError as e:  # e.g. 4-channel samples as PNG, a .pt larger than memory
        parser.error(f"--out: {e}")
    except OSError as e:  # a full disk, no permission
        parser.error(f"--out: cannot write '{args.out}': {e.strerror or e}")
    where = args.out if len(paths) == 1 else f"{args.out}/ ({paths[0].name} .. {paths[-1].name})"
    print(f"wrote {args.num} samples to {where}")


if __name__ == "__main__":
    main()
