"""``surm finetune``: fine-tune one packaged model on one data set with one method.

Writes ``results.json`` (metrics, trainable parameters, wall time, peak memory, loss curve)
and the trained weights (``adapter/`` for PEFT methods, ``trainable.safetensors`` for full /
head / BitFit) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "fine-tune a packaged model on a packaged data set with one method (LoRA, SURM, ...)"

EPILOG = """\
methods (--method), compact strings kind[:positional][:key=value...]:
  full                          full fine-tuning
  head                          classification head only
  bitfit                        biases + head
  lora:R                        PEFT LoRA rank R (query/value; 1x1 convs for images), lora_alpha=8
  houlsby:R                     bottleneck adapters, width R, after attention output and FFN output
  pfeiffer:R                    bottleneck adapters after the FFN output only
  surm:STRUCTURE[:serial]       SURM, STRUCTURE one of circulant, skew_circulant, toeplitz,
                                symmetric_toeplitz, kronecker, ldr, low_rank; parallel (LoRA
                                positions) by default, serial = adapter positions
  knobs: :block_size=B :rank=R :terms=K :factors=((a1,a2),(b1,b2)) :alpha=A :dropout=P
         :activation=gelu|relu|silu|tanh|identity
  e.g. lora:8   surm:circulant   surm:circulant:block_size=128   surm:ldr:rank=2
       surm:toeplitz:serial   houlsby:32   pfeiffer:24

data sets (--data): rotten_tomatoes, election_tweets, r8, newsgroups (text, MiniLM);
mnist, digits (images, EfficientNet-Lite0). Every method also trains the classification head.

example:
  surm finetune --data rotten_tomatoes --method surm:circulant --train-fraction 0.2
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``finetune`` on an ``argparse`` subparsers object; sets ``func=run``."""
    p = subparsers.add_parser("finetune", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="rotten_tomatoes", help="data set (default: rotten_tomatoes)")
    p.add_argument("--method", default="surm:circulant", help="method string, see below (default: surm:circulant)")
    p.add_argument("--model", default=None,
                   help="minilm | tiny-bert (random, for tests) | efficientnet | a local transformers "
                        "directory (default: minilm for text, efficientnet for images)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, docs/lr_sweep.md)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the classification head (default: the method's rate; BitFit: head-only's)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs, fractions allowed (default: 1)")
    p.add_argument("--min-steps", type=int, default=0, help="train at least this many steps (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="default: 16 (the default learning rates assume it)")
    p.add_argument("--seed", type=int, default=0, help="head init, adapter init, data order and subsample")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--train-fraction", type=float, default=None, help="keep this fraction of the training set")
    size.add_argument("--max-train", type=int, default=None, help="keep about this many training examples")
    p.add_argument("--max-eval", type=int, default=1000,
                   help="cap validation and test at a fixed subset of this size (default: 1000; 0 = all)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text (default: 64)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: outputs/finetune/DATA-METHOD-sSEED)")
    p.add_argument("--no-save", action="store_true", help="do not save the trained weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def spec_from_args(args: argparse.Namespace):
    """The :class:`surm.experiments.common.RunSpec` the arguments describe."""
    from surm import data
    from surm import methods as surm_methods
    from surm.experiments.common import RunSpec

    surm_methods.parse(args.method)  # fail early with the grammar
    if args.data not in data.names():
        raise SystemExit(f"surm finetune: unknown data set {args.data!r}; known: {', '.join(data.names())}")
    image = args.data in ("mnist", "digits")
    model = args.model or ("efficientnet" if image else "minilm")
    return RunSpec(
        dataset=args.data, method=args.method, seed=args.seed, lr=args.lr, epochs=args.epochs,
        min_steps=args.min_steps, batch_size=args.batch_size, n_train=args.max_train,
        train_fraction=args.train_fraction, n_eval=args.max_eval or None, max_length=args.max_length,
        image_size=args.image_size, model=model, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        eval_splits=("validation", "test"), device=args.device, head_lr=args.head_lr,
    )


def run(args: argparse.Namespace) -> dict:
    """Run ``surm finetune``; prints a summary and returns the results record."""
    import peft
    from safetensors.torch import save_file

    from surm import methods as surm_methods
    from surm.experiments.common import execute

    try:
        spec = spec_from_args(args)
    except ValueError as err:
        raise SystemExit(f"surm finetune: {err}") from None
    out = args.out or Path("outputs/finetune") / spec.slug
    out.mkdir(parents=True, exist_ok=True)
    record, model, _ = execute(spec, progress=not args.quiet)
    if not args.no_save:
        if isinstance(model, peft.PeftModel):
            model.save_pretrained(out / "adapter")
            record["saved"] = str(out / "adapter")
        else:
            save_file({k: v.cpu() for k, v in surm_methods.trainable_state(model).items()},
                      str(out / "trainable.safetensors"))
            record["saved"] = str(out / "trainable.safetensors")
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(summary(record, out))
    return record


def summary(record: dict, out: Path) -> str:
    """A few lines for the terminal."""
    from surm.experiments.common import fmt_lr

    lines = [f"{record['label']} on {record['spec']['dataset']} ({record['sizes']['train']} training examples, "
             f"lr {fmt_lr(record)}, {record['train']['steps']} steps, seed {record['spec']['seed']})"]
    for split in ("validation", "test"):
        if split in record:
            m = record[split]
            lines.append(f"  {split:<10} accuracy {100 * m['accuracy']:.2f} %   macro-F1 {100 * m['macro_f1']:.2f} %   "
                         f"(n={m['n']})")
    lines.append(f"  trainable parameters {record['trainable_params']:,} ({record['adapter_params']:,} without the head)")
    lines.append(f"  train time {record['train_seconds']:.1f} s, eval {record['eval_seconds']:.1f} s; peak memory "
                 f"{record['peak_memory_mb']:.0f} MiB (+{record['peak_memory_growth_mb']:.0f} MiB while training; "
                 f"{record['memory_measure']})")
    lines.append(f"  results: {out / 'results.json'}" + (f"; weights: {record['saved']}" if "saved" in record else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="surm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
