"""FID, KID and precision/recall of a GAN checkpoint; held-out ELBO and importance-weighted NLL of a VAE's.

    python scripts/evaluate.py --checkpoint outputs/dcgan/RUN/checkpoints/best.ckpt --num 10000
    python scripts/evaluate.py --checkpoint ... --reference /path/to/images --json
    python scripts/evaluate.py --checkpoint ... --metrics extractor.weights_path=/path/to/weights-inception-....pth
    python scripts/evaluate.py --checkpoint outputs/vae_mlp/RUN/checkpoints/last.ckpt            # k=500
    python scripts/evaluate.py --checkpoint ... --k 5000 --data root=/path/to/mnist-t10k

GAN (any model without an encoder): ``--num`` samples of the generator (the EMA weights when the run kept
them, else ``--no-ema``'s raw ones) against the run's training data or ``--reference FOLDER``, in the run's
``metrics`` settings (``metrics=fid``'s defaults when it had none), changed with ``--metrics KEY=VALUE``
as on the training command line without the ``metrics.`` prefix (``extractor._target_=mypkg.Net``).
A class-conditional checkpoint's samples have balanced labels (sample i of class i % num_classes), and it gets
``intra_fid`` (the per-class FID against the reference images of that class, averaged) and, scored with a classifier
of its classes (``extractor._target_=gantrain.extractors.mnist.MnistFeatures``), ``class_accuracy`` (% of samples
classified as their label). The table's second line (``--json``: ``protocol``) says how the scores were computed: the
reference, its count and size (``--metrics reference_resolution=native``: the images at their own size, e.g. MNIST's
28 px, instead of the model's), the extractor and its weights' hash; a warning says when the run recorded another.

The held-out images are the last ``data.holdout`` images of the run's own data config (train with
``data.holdout=N``), binarized with the fixed seed of static binarization when the run binarized.
The NLL is the IWAE bound (Burda et al. 2016) with ``--k`` importance samples: an upper bound on
-log p(x) that tightens as k grows. The likelihood is the run's reconstruction term (``loss.bce``:
Bernoulli, ``loss.gaussian``: Gaussian with its sigma). User mistakes end as one
``evaluate.py: error: ...`` line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gantrain import checkpoint as ckpt_io
from gantrain import elbo
from gantrain.data import DataError
from gantrain.errors import ConfigError, GantrainError
from gantrain.hydra_errors import user_error
from gantrain.metrics.suite import describe
from gantrain.sampling import load_model
from gantrain.trainer import resolve_device

_ABSENT = object()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a training checkpoint (last.ckpt, best.ckpt)")
    p.add_argument("--num", type=int, default=None, help="GAN: generated images scored (default: metrics.num_samples)")
    p.add_argument("--reference", metavar="FOLDER", help="GAN: images to compare with (default: the run's data)")
    p.add_argument(
        "--metrics",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="GAN: overrides of the metrics config (without the metrics. prefix), e.g. which=[fid] or "
        "extractor.weights_path=/path/weights-inception-2015-12-05-6726825d.pth",
    )
    p.add_argument("--k", type=int, default=500, help="importance samples per image (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="images per pass (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=100, help="importance samples decoded at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance samples (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights, not the EMA (trainer.ema)")
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the run's data config, written as on the training command line (without the "
        "data. prefix), e.g. root=/abs/path when the run used a relative path, or batch_size=32",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def with_overrides(data_cfg: DictConfig, items: Sequence[str], flag: str = "--data") -> DictConfig:
    """``data_cfg`` with each ``KEY=VALUE`` of ``items`` applied, the value parsed as on the training command
    line (Hydra's override grammar: ``32`` is an int, ``[1,2]`` a list, ``null`` None); GantrainError
    naming the item when it is not one ``KEY=VALUE`` or KEY is not a key of the run's config node
    (``flag``'s; a ``_target_`` may be set, to use another class)."""
    parser = OverridesParser.create()
    for item in items:
        if "=" not in item:
            raise GantrainError(f"{flag} {item!r}: expected KEY=VALUE, e.g. root=/path")
        try:
            [override] = parser.parse_overrides([item])
        except OverrideParseException as e:
            raise GantrainError(f"{flag} {item!r}: not a valid value ({e.message.splitlines()[0]})") from None
        key = override.key_or_group
        if override.is_sweep_override() or override.type != OverrideType.CHANGE or override.package is not None:
            raise GantrainError(f"{flag} {item!r}: expected one KEY=VALUE (no sweeps, +, ~ or @)")
        new_target = key.endswith("._target_") and isinstance(
            OmegaConf.select(data_cfg, key.rsplit(".", 1)[0]), DictConfig
        )
        if not new_target and OmegaConf.select(data_cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            keys = ", ".join(k for k in data_cfg.keys() if not str(k).startswith("_"))
            node = flag.removeprefix("--")
            raise GantrainError(
                f"{flag} {key}: not a key of the run's {node} config ({data_cfg.get('_target_')}); it has: {keys}"
            )
        OmegaConf.update(data_cfg, key, override.value(), merge=False)
    return data_cfg


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    device = resolve_device(args.device, key="--device")
    ckpt = ckpt_io.load(args.checkpoint, what="--checkpoint")
    data_cfg = with_overrides(OmegaConf.create(ckpt["config"]["data"]), args.data)
    if not _is_vae(ckpt):
        return evaluate_samples(args, ckpt, data_cfg, device)
    try:
        log_likelihood = elbo.likelihood_of_loss(ckpt.get("config", {}).get("loss", {}))
    except GantrainError as e:
        raise GantrainError(f"--checkpoint: '{args.checkpoint}': {e}") from None
    model = load_model(args.checkpoint, device, what="--checkpoint", ema=not args.no_ema)
    vae = model.g
    if not hasattr(vae, "encode"):
        raise GantrainError(f"--checkpoint: '{args.checkpoint}' holds a {type(vae).__name__}, not a VAE")
    try:
        data = instantiate(data_cfg)
        heldout = data.heldout()  # (N, C, R, R) in [-1, 1]
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        if isinstance(err, ConfigError) and err.key:  # names a key of the data config, as --data would
            raise GantrainError(f"--data {err}") from None
        hint = " (if the run used paths relative to another directory, pass e.g. --data root=/abs/path)"
        raise GantrainError(f"--data: {err}" + (hint if isinstance(err, DataError) else "")) from None
    batches = heldout.split(args.batch_size)
    if model.conditional:  # the ELBO of log p(x | y): each held-out image with its label
        batches = list(zip(batches, data.heldout_labels().split(args.batch_size)))
    result = elbo.evaluate_nll(
        vae,
        batches,
        k=args.k,
        chunk=args.chunk,
        log_likelihood=log_likelihood,
        generator=torch.Generator(device).manual_seed(args.seed),
    )
    return {**result, "k": args.k}


def _is_vae(ckpt: dict) -> bool:
    """Whether the checkpoint's generator is a VAE (an encoder), from its model config."""
    g = (ckpt.get("config", {}).get("model") or {}).get("g") or {}
    return "encoder" in g


def evaluate_samples(args: argparse.Namespace, ckpt: dict, data_cfg: DictConfig, device) -> dict:
    """FID/KID/PR of ``--num`` samples of the checkpoint's generator against its data or ``--reference``."""
    from gantrain.metrics.evaluators import LOADING_KEYS
    from gantrain.train import compose_config

    saved = ckpt["config"].get("metrics")
    defaults = OmegaConf.to_container(compose_config("metrics=fid").metrics)
    # a run of an older gantrain lacks the newer keys (reference_resolution): their defaults, today's behaviour
    newer = {k: v for k, v in defaults.items() if k != "extractor" and k not in (saved or {})}
    metrics_cfg = OmegaConf.create({**newer, **saved} if saved else defaults)
    metrics_cfg = with_overrides(metrics_cfg, args.metrics, flag="--metrics")
    if args.num is not None:
        metrics_cfg.num_samples = args.num
    if args.reference is not None:
        if not Path(args.reference).expanduser().is_dir():  # before the extractor loads its weights
            raise GantrainError(f"--reference '{args.reference}': must be an existing folder of images")
        metrics_cfg.reference = args.reference
    try:
        metrics = instantiate(metrics_cfg).to(device)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        flags = {"num_samples": "--num", "reference": "--reference"}
        if isinstance(err, ConfigError) and err.key in flags:
            raise GantrainError(f"{flags[err.key]}{str(err).removeprefix(err.key)}") from None
        raise GantrainError(
            f"--metrics {err}" if isinstance(err, ConfigError) and err.key else f"--metrics: {err}"
        ) from None
    model = load_model(args.checkpoint, device, what="--checkpoint", ema=not args.no_ema)
    try:
        data = instantiate(data_cfg)
        key = {k: v for k, v in OmegaConf.to_container(data_cfg).items() if k not in LOADING_KEYS}
        result = metrics.evaluate(model, data, key)
    except DataError as e:
        raise GantrainError(str(e).replace("metrics.reference", "--reference")) from None
    except ConfigError as e:
        raise GantrainError(f"--metrics {e}" if e.key == "reference_resolution" else f"--data: {e}") from None
    except GantrainError as e:
        raise GantrainError(f"--data: {e}") from None
    out = {name.removeprefix("metrics/"): value for name, value in result.items()}
    reference = metrics.reference or "the run's training data"
    extractor = type(metrics.extractor).__name__
    tags = [t.removeprefix("metrics/") for t in metrics.tags_for(model)]
    weights = "raw" if args.no_ema or not ckpt.get("ema") else "EMA"
    about = {"step": ckpt["step"], "weights": weights, "num": metrics.num_samples, "reference": reference}
    saved = ckpt.get("metrics_protocol")
    if saved and saved != metrics.protocol:
        before, now = describe(saved), describe(metrics.protocol)
        logging.getLogger(__name__).warning("the run was scored under another protocol: %s; these: %s", before, now)
    return {**{t: out[t] for t in tags}, **about, "extractor": extractor, "protocol": metrics.protocol}


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="evaluate.py: warning: %(message)s")
    for name in ("k", "batch_size", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.num is not None and args.num < 2:
        parser.error(f"--num={args.num}: must be >= 2 (generated images scored)")
    try:
        result = evaluate(args)
    except GantrainError as e:
        parser.error(" ".join(str(e).split()))
    if args.json:
        print(json.dumps(result))  # "protocol": reference, num_reference, reference_resolution, size, extractor...
    elif "nll_iwae" not in result:
        print(f"{args.checkpoint} (step {result['step']}, {result['weights']} weights): {result['num']} samples vs "
              f"{result['reference']}, {result['extractor']} features")  # fmt: skip
        print(f"  protocol: {describe(result['protocol'])}")
        for name in ("fid", "kid", "precision", "recall", "intra_fid", "class_accuracy"):
            if name in result:
                print(f"  {name:<10} {result[name]:.6g}")
    else:
        print(
            f"{int(result['images'])} held-out images: ELBO {result['elbo']:.2f} nats, "
            f"IWAE NLL (k={args.k}) {result['nll_iwae']:.2f} nats"
        )


if __name__ == "__main__":
    main()
