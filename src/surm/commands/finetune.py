"""``surm finetune``: fine-tune one packaged model on one data set with one method.

Writes ``results.json`` (metrics, trainable parameters, wall time, peak memory, loss curve)
and the trained weights into ``--output-dir`` (default ``outputs/finetune/<run>``): an
``adapter/`` folder for PEFT methods, ``trainable.safetensors`` for full / head / BitFit. For a
text model the weights' folder also holds the tokenizer and the model config with the data
set's ``id2label`` / ``label2id``, so that it serves inference as it is.

Every input is checked before a model is loaded: the data set, the method string or
``--adapter-config``, the model, and whether the adapter fits the model's layers (the method
is applied to the model's skeleton on the meta device, which holds no weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from surm.commands.errors import UsageError
from surm.outputs import default_dir

HELP = "fine-tune a packaged model on a packaged data set with one method (LoRA, SURM, ...)"

EPILOG = """\
methods (--method), compact strings kind[:positional][:key=value...]:
  full                          full fine-tuning
  head                          classification head only
  bitfit                        biases + head
  lora:R                        PEFT LoRA rank R (query/value; 1x1 convs for images), lora_alpha=8
  c3a:B                         PEFT C3A, block size B, on the LoRA positions (give --learning-rate)
  houlsby:R                     bottleneck adapters, width R, after attention output and FFN output
  pfeiffer:R                    bottleneck adapters after the FFN output only
  surm:STRUCTURE[:serial]       SURM, STRUCTURE one of circulant, skew_circulant, toeplitz,
                                symmetric_toeplitz, kronecker, ldr, low_rank; parallel (LoRA
                                positions) by default, serial = adapter positions
  knobs: :block_size=B :rank=R :terms=K :factors=((a1,a2),(b1,b2)) :alpha=A :dropout=P
         :activation=gelu|relu|silu|tanh|identity
  e.g. lora:8   surm:circulant   surm:circulant:block_size=128   surm:ldr:rank=2
       surm:toeplitz:serial   houlsby:32   pfeiffer:24

adapter configs (--adapter-config FILE): a SurmConfig as JSON, either the adapter_config.json
that save_pretrained writes (or the folder holding it) or a plain object of SurmConfig fields,
e.g. {"structure": "circulant", "target_modules": ["query", "value"],
"knob_pattern": {"value": {"block_size": 128}}}. The classification head is always trained
(added to modules_to_save).

data sets (--data): rotten_tomatoes, election_tweets, r8, newsgroups (text, MiniLM);
mnist, digits (images, EfficientNet-Lite0); grimm_tales, friends (prompt -> response pairs,
SmolLM2-135M-Instruct through its chat template, the LM head frozen; --model tiny-llama for a
tiny random Llama; default --max-seq-length 256; adapters on Llama's q_proj ... down_proj).

examples:
  surm finetune --data rotten_tomatoes --method surm:circulant --train-fraction 0.2
  surm finetune --data grimm_tales --model smollm2-135m --method surm:circulant --max-steps 24 \
      --per-device-train-batch-size 4
"""

DEFAULT_METHOD = "surm:circulant"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``finetune`` on an ``argparse`` subparsers object; sets ``func=run``.

    Flags carry the names of transformers' ``TrainingArguments`` where one exists; the short
    names of earlier versions (``--lr``, ``--epochs``, ``--batch-size``, ``--out``, ...) remain
    as aliases."""
    p = subparsers.add_parser("finetune", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to train")
    what.add_argument("--data", default="rotten_tomatoes", help="data set (default: rotten_tomatoes)")
    adapter = what.add_mutually_exclusive_group()
    adapter.add_argument("--method", help=f"method string, see below (default: {DEFAULT_METHOD})")
    adapter.add_argument("--adapter-config", type=Path, metavar="FILE",
                         help="a SurmConfig JSON instead of --method (target_modules, knob_pattern, ...)")
    what.add_argument("--model",
                      help="minilm | tiny-bert (random, for tests) | efficientnet | smollm2-135m | tiny-llama "
                           "(random, for tests) | a local transformers directory (default: minilm for text, "
                           "efficientnet for images, smollm2-135m for prompt -> response data)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, metavar="LR",
                     help="learning rate (default: the method's, docs/lr_sweep.md)")
    opt.add_argument("--head-learning-rate", "--head-lr", dest="head_learning_rate", type=float, metavar="LR",
                     help="learning rate of the classification head (default: the method's rate; BitFit: head-only's)")
    opt.add_argument("--num-train-epochs", "--epochs", dest="num_train_epochs", type=float, default=1.0, metavar="N",
                     help="epochs, fractions allowed (default: 1)")
    opt.add_argument("--max-steps", type=int, metavar="N",
                     help="train exactly this many optimizer steps, whatever the epochs (default: from the epochs)")
    opt.add_argument("--min-steps", type=int, default=0, metavar="N",
                     help="train at least this many steps (default: 0)")
    opt.add_argument("--per-device-train-batch-size", "--batch-size", dest="per_device_train_batch_size", type=int,
                     default=16, metavar="N", help="default: 16 (the default learning rates assume it)")
    opt.add_argument("--weight-decay", type=float, default=0.01, metavar="WD",
                     help="AdamW weight decay (default: 0.01)")
    opt.add_argument("--warmup-ratio", type=float, default=0.06, metavar="R",
                     help="linear warm-up over this fraction of the steps (default: 0.06)")
    opt.add_argument("--seed", type=int, default=0, help="head init, adapter init, data order and subsample")
    opt.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")

    sizes = p.add_argument_group("data sizes")
    train_size = sizes.add_mutually_exclusive_group()
    train_size.add_argument("--train-fraction", type=float, metavar="F", help="keep this fraction of the training set")
    train_size.add_argument("--max-train-samples", "--max-train", dest="max_train_samples", type=int, metavar="N",
                            help="keep about this many training examples")
    sizes.add_argument("--max-eval-samples", "--max-eval", dest="max_eval_samples", type=int, default=1000, metavar="N",
                       help="cap validation and test at a fixed subset of this size (default: 1000; 0 = all)")
    sizes.add_argument("--max-seq-length", "--max-length", dest="max_seq_length", type=int, default=None, metavar="N",
                       help="max tokens per text (default: 64; 256 for prompt -> response data)")
    sizes.add_argument("--image-size", type=int, default=64, metavar="PX", help="image side in pixels (default: 64)")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "--out", dest="output_dir", type=Path, metavar="DIR",
                     help="output folder (default: outputs/finetune/DATA-METHOD-sSEED)")
    out.add_argument("--no-save", action="store_true", help="do not save the trained weights")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------- checking the input


def spec_from_args(args: argparse.Namespace):
    """``(spec, adapter)``: the :class:`surm.experiments.runs.RunSpec` the arguments describe
    and the PEFT config of ``--adapter-config`` (None without it). :class:`UsageError` on
    anything wrong, found without loading a model."""
    from surm.experiments.runs import RunSpec

    adapter = None if args.adapter_config is None else load_adapter_config(args.adapter_config)
    method = _method_of(adapter) if adapter is not None else args.method or DEFAULT_METHOD
    epochs, min_steps = args.num_train_epochs, args.min_steps
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
        if args.min_steps > args.max_steps:
            raise UsageError(f"--min-steps {args.min_steps} exceeds --max-steps {args.max_steps}")
        epochs, min_steps = 0.0, args.max_steps  # steps = max(ceil(0 * batches), min_steps): exactly max_steps
    try:
        spec = RunSpec(
            dataset=args.data, method=method, seed=args.seed, lr=args.learning_rate, epochs=epochs,
            min_steps=min_steps, batch_size=args.per_device_train_batch_size, n_train=args.max_train_samples,
            train_fraction=args.train_fraction, n_eval=args.max_eval_samples or None,
            max_length=args.max_seq_length or 64, image_size=args.image_size, model=args.model,
            weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, eval_splits=("validation", "test"),
            device=args.device, head_lr=args.head_learning_rate,
        )
    except ValueError as err:  # data set, method string, model against data, no default learning rate
        raise UsageError(err) from None
    if adapter is not None:
        adapter = _with_head(adapter, spec.profile.head)
    check_fits(spec, adapter)
    return spec, adapter


def load_adapter_config(path: Path):
    """A :class:`surm.SurmConfig` from JSON: a saved ``adapter_config.json`` (or the folder
    holding one) or a plain object of SurmConfig fields. The config trains (``inference_mode``
    is turned off)."""
    import dataclasses

    from surm.peft import SURM, SurmConfig

    file = path / "adapter_config.json" if path.is_dir() else path
    try:
        fields = json.loads(file.read_text())
    except OSError as err:
        raise UsageError(f"--adapter-config: cannot read {file} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--adapter-config: {file} is not JSON ({err})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"--adapter-config: {file} holds a {type(fields).__name__}; expected an object of "
                         f"SurmConfig fields")
    peft_type = fields.pop("peft_type", SURM)
    if peft_type != SURM:
        raise UsageError(f"--adapter-config: {file} is a {peft_type} config; surm finetune takes SURM configs "
                         f"(peft_type SURM, or no peft_type); for LoRA use --method lora:R")
    known = {f.name for f in dataclasses.fields(SurmConfig) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"--adapter-config: {file} has unknown field(s) {', '.join(unknown)}; "
                         f"SurmConfig fields: {', '.join(sorted(known - {'peft_type'}))}")
    fields["inference_mode"] = False
    try:
        return SurmConfig(**fields)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--adapter-config {file}: {err}") from None


def _method_of(adapter) -> str:
    """The method string closest to a SurmConfig: its learning-rate default and label."""
    return f"surm:{adapter.structure}" + (":serial" if adapter.placement == "serial" else "")


def _with_head(adapter, head: str | None):
    """``adapter`` with the classification head in ``modules_to_save`` (it is new: it must train)."""
    if head is not None and head not in (adapter.modules_to_save or ()):
        adapter.modules_to_save = [*(adapter.modules_to_save or ()), head]
    return adapter


def check_fits(spec, adapter=None) -> None:
    """Apply the method (or ``adapter``) to the skeleton of ``spec``'s model on the meta device
    (:func:`surm.experiments.skeleton.check_fits`): an unknown model, a knob the family lacks or
    a block size that does not divide a layer fails here, as a :class:`UsageError`, with no
    weights loaded."""
    from surm.experiments import skeleton

    try:
        skeleton.check_fits(spec, adapter)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _skeleton(spec):
    """``spec``'s model on the meta device (:func:`surm.experiments.skeleton.skeleton`); a bad
    model is a :class:`UsageError`."""
    from surm.experiments import skeleton

    try:
        return skeleton.skeleton(spec)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _text_model_path(model: str) -> str:
    from surm.experiments.skeleton import text_model_path

    return text_model_path(model)


# --------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> dict:
    """Run ``surm finetune``; prints a summary and returns the results record (as JSON)."""
    from surm.experiments.runs import execute

    if _is_causal_lm_data(args.data):
        from surm.commands import finetune_lm

        return finetune_lm.run(args, DEFAULT_METHOD)

    spec, adapter = spec_from_args(args)
    name = None if adapter is None else _config_name(args.adapter_config)
    out = args.output_dir or default_dir("finetune") / (spec.slug if name is None else f"{spec.slug}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    record, model, _ = execute(spec, progress=not args.quiet, adapter=adapter)
    result = record.to_json()
    if adapter is not None:  # the spec knows the method string, not the config: the config tells runs apart
        config = json.loads(json.dumps(adapter.to_dict(), default=_jsonable))
        digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        result.update(label=f"{record.label} ({name})", key=f"{record.key}-{digest}", adapter_config=config)
    if not args.no_save:
        result["saved"] = str(save(model, spec, record.label_names, out))
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    print(summary(result, out))
    return result


def _is_causal_lm_data(name: str) -> bool:
    """Whether ``name`` is a prompt -> response data set (False for unknown names too: the
    classifier path then says which names it knows)."""
    from surm import data

    try:
        return data.modality(name) == data.CAUSAL_LM
    except ValueError:
        return False


def _config_name(path: Path) -> str:
    """A short name for an adapter config file: its stem, or its folder's name for
    ``adapter_config.json``."""
    path = path.resolve()
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == "adapter_config.json" else path.stem


def save(model, spec, label_names: list[str], out: Path) -> Path:
    """Save the trained weights into ``out``; returns where they are.

    PEFT models: ``out/adapter`` (``save_pretrained``). Full / head / BitFit:
    ``out/trainable.safetensors``, the tensors that trained. A text model's config, with
    ``id2label`` / ``label2id`` from ``label_names``, and its tokenizer go beside them."""
    import peft
    from safetensors.torch import save_file

    from surm import methods

    if isinstance(model, peft.PeftModel):
        folder = weights = out / "adapter"
        model.save_pretrained(folder)
        base = model.get_base_model()
    else:
        folder, weights = out, out / "trainable.safetensors"
        save_file({k: v.cpu() for k, v in methods.trainable_state(model).items()}, str(weights))
        base = model
    if spec.modality == "text":
        from transformers import AutoTokenizer

        base.config.id2label = dict(enumerate(label_names))
        base.config.label2id = {name: i for i, name in enumerate(label_names)}
        base.config.save_pretrained(folder)
        local = spec.model in ("minilm", "tiny-bert")
        AutoTokenizer.from_pretrained(_text_model_path(spec.model), local_files_only=local).save_pretrained(folder)
    return weights


def _jsonable(value):
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):  # SurmConfig.target_modules
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(record: dict, out: Path) -> str:
    """A few lines for the terminal."""
    lr = f"{record['lr']:g}" + (f" (head {record['head_lr']:g})" if record.get("head_lr") is not None else "")
    lines = [f"{record['label']} on {record['spec']['dataset']} ({record['sizes']['train']} training examples, "
             f"lr {lr}, {record['train']['steps']} steps, seed {record['spec']['seed']})"]
    for split in ("validation", "test"):
        if split in record:
            m = record[split]
            lines.append(f"  {split:<10} accuracy {100 * m['accuracy']:.2f} %   macro-F1 {100 * m['macro_f1']:.2f} %   "
                         f"(n={m['n']})")
    lines.append(f"  trainable parameters {record['trainable_params']:,} "
                 f"({record['adapter_params']:,} without the head)")
    lines.append(f"  train time {record['train_seconds']:.1f} s, eval {record['eval_seconds']:.1f} s; peak memory "
                 f"{record['peak_memory_mb']:.0f} MiB (+{record['peak_memory_growth_mb']:.0f} MiB while training; "
                 f"{record['memory_measure']})")
    lines.append(f"  results: {out / 'results.json'}" + (f"; weights: {record['saved']}" if "saved" in record else ""))
    return "\n".join(lines)
