"""``surm finetune``: fine-tune one model on one data set with one method.

One route for every model: the arguments become one :class:`~surm.harness.runs.RunSpec`
(classifier, CNN or causal LM alike), :func:`~surm.harness.runs.execute` trains it, and the
output folder has one layout (:mod:`surm.harness.runs.saving`): ``results.json`` and the
weights (``adapter/`` for PEFT methods, ``trainable.safetensors`` otherwise) with the tokenizer
and, for a classifier, the labelled model config.

Every input is checked before a model is loaded: the data set (a packaged name or a user's
file), the method string or ``--adapter-config``, the model, the sizes, and whether the adapter
fits the model's layers (the method is applied to the model's skeleton on the meta device).

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) a causal LM trains in
DistributedDataParallel over a gloo process group, each process on its share of every batch;
rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from surm.commands.errors import UsageError
from surm.harness.outputs import default_dir

HELP = "fine-tune a model on a data set (packaged or your own file) with one method (LoRA, SURM, ...)"

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
                                symmetric_toeplitz, kronecker, ldr, low_rank; parallel (every
                                linear map of each block) by default, serial = adapter positions
  knobs: :block_size=B :rank=R :terms=K :factors=((a1,a2),(b1,b2)) :alpha=A :dropout=P
         :activation=gelu|relu|silu|tanh|identity (serial) :targets=qv|all
  e.g. lora:8   surm:circulant   surm:circulant:block_size=128   surm:ldr:rank=2
       surm:toeplitz:serial   houlsby:32   pfeiffer:24

adapter configs (--adapter-config FILE): a SurmConfig as JSON, either the adapter_config.json
that save_pretrained writes (or the folder holding it) or a plain object of SurmConfig fields,
e.g. {"structure": "circulant", "target_modules": ["query", "value"],
"knob_pattern": {"value": {"block_size": 128}}}. A classifier's head is always trained (added to
modules_to_save). The default learning rate is surm.recommended_lr of the config, on any data.

data sets (--data): rotten_tomatoes, election_tweets, r8, newsgroups (text, MiniLM);
mnist, digits (images, EfficientNet-Lite0); grimm_tales, friends (prompt -> response pairs,
SmolLM2-135M-Instruct through its chat template, the LM head frozen; --model tiny-llama for a
tiny random Llama; default --max-seq-length 256). Or your own data: a .csv or .jsonl file with
the columns text,label (classification) or prompt,response or messages (a chat, for a causal
LM), optionally a split column (train/validation/test), or a folder saved by datasets'
save_to_disk; without a validation or test split, 10 % of train becomes each.

examples:
  surm finetune --data rotten_tomatoes --method surm:circulant --train-fraction 0.2
  surm finetune --data my_reviews.csv --method surm:toeplitz --num-train-epochs 3
  surm finetune --data grimm_tales --model smollm2-135m --method surm:circulant --max-steps 24 \\
      --per-device-train-batch-size 4
  surm finetune --data my_chats.jsonl --model tiny-llama --method lora:8 --max-steps 10
"""

DEFAULT_METHOD = "surm:circulant"
#: Tokens per example when ``--max-seq-length`` is not given, by the data's modality.
DEFAULT_MAX_LENGTH = {"text": 64, "image": 64, "causal_lm": 256}
#: Validation evaluations during training of a causal LM (the validation curve).
LM_EVAL_POINTS = 4


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``finetune`` on an ``argparse`` subparsers object; sets ``func=run``.

    Flags carry the names of transformers' ``TrainingArguments`` where one exists; the short
    names of earlier versions (``--lr``, ``--epochs``, ``--batch-size``, ``--out``, ...) remain
    as aliases."""
    p = subparsers.add_parser("finetune", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to train")
    what.add_argument("--data", default="rotten_tomatoes",
                      help="a packaged data set or your own .csv / .jsonl / saved dataset (default: rotten_tomatoes)")
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
    opt.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                     help="the base model's dtype; adapters and FFTs stay float32 (default: float32)")

    sizes = p.add_argument_group("data sizes")
    train_size = sizes.add_mutually_exclusive_group()
    train_size.add_argument("--train-fraction", type=float, metavar="F", help="keep this fraction of the training set")
    train_size.add_argument("--max-train-samples", "--max-train", dest="max_train_samples", type=int, metavar="N",
                            help="keep about this many training examples")
    sizes.add_argument("--max-eval-samples", "--max-eval", dest="max_eval_samples", type=int, default=1000, metavar="N",
                       help="cap validation and test at a fixed subset of this size (default: 1000; 0 = all)")
    sizes.add_argument("--max-seq-length", "--max-length", dest="max_seq_length", type=int, default=None, metavar="N",
                       help="max tokens per text (default: 64; for prompt -> response data 256, or the longest "
                            "prompt plus 64 where that is more; a response is cut to fit, a prompt never)")
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
    """The :class:`~surm.harness.runs.RunSpec` the arguments describe; :class:`UsageError` on
    anything wrong, found without loading a model."""
    from surm.harness import data
    from surm.harness.runs import RunSpec, adapter_json, steps_setting

    adapter = None if args.adapter_config is None else load_adapter_config(args.adapter_config)
    method = _label_method(adapter) if adapter is not None else args.method or DEFAULT_METHOD
    try:
        epochs, min_steps = steps_setting(args.num_train_epochs, args.max_steps, args.min_steps)
        modality = data.modality(args.data)
    except ValueError as err:
        raise UsageError(_flag_names(err)) from None
    if modality == data.CAUSAL_LM and args.head_learning_rate is not None:
        raise UsageError("--head-learning-rate: causal LMs are fine-tuned without a head")
    causal = modality == data.CAUSAL_LM
    try:
        spec = RunSpec(
            dataset=args.data, method=method, seed=args.seed, lr=args.learning_rate, epochs=epochs,
            min_steps=min_steps, batch_size=args.per_device_train_batch_size, n_train=args.max_train_samples,
            train_fraction=args.train_fraction, n_eval=args.max_eval_samples or None,
            max_length=args.max_seq_length or DEFAULT_MAX_LENGTH[modality], image_size=args.image_size,
            model=args.model, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
            eval_splits=("validation", "test"), device=args.device, head_lr=args.head_learning_rate,
            adapter=None if adapter is None else adapter_json(adapter),
            eval_points=LM_EVAL_POINTS if causal else 0, dtype=args.dtype,
        )
    except ValueError as err:  # data set, method string, model against data, no default learning rate
        raise UsageError(_flag_names(err)) from None
    check_fits(spec)
    if causal:
        spec = fit_prompts(spec, given=args.max_seq_length is not None)
    return spec


def fit_prompts(spec, given: bool):
    """A causal-LM spec whose ``max_length`` leaves room for every prompt's response, found with
    the tokenizer alone: without ``--max-seq-length`` the default (256) grows to the longest prompt
    plus 64 tokens; a given one too short is a :class:`UsageError` that says what fits."""
    from surm.harness.runs import longest_prompt

    longest, split, too_long = longest_prompt(spec)
    if too_long == 0:
        return spec
    if not given:
        return spec.replace(max_length=longest + 64)
    where = ("train", "validation", "test")[split]
    raise UsageError(f"--max-seq-length {spec.max_length}: {too_long} prompt(s) of {spec.dataset} take that many "
                     f"tokens or more with the chat template, leaving no room for the response (the longest, in "
                     f"{where}, takes {longest}); give --max-seq-length {longest + 64} or more, or leave it out")


def _flag_names(err: Exception) -> str:
    """A run-core message in the command's words (``max_steps`` is ``--max-steps`` here)."""
    text = str(err)
    for field, flag in (("max_steps", "--max-steps"), ("min_steps", "--min-steps"), ("max_length", "--max-seq-length"),
                        ("batch_size", "--per-device-train-batch-size")):
        if text.startswith(field + " ") or f" {field} " in text:
            text = text.replace(field, flag)
    return text


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


def _label_method(adapter) -> str:
    """The method string that labels a run of a SurmConfig (its rate comes from the config)."""
    return f"surm:{adapter.structure}" + (":serial" if adapter.placement == "serial" else "")


def check_fits(spec) -> None:
    """Apply the method (or the spec's adapter config) to the skeleton of ``spec``'s model on the
    meta device (:func:`surm.harness.runs.skeleton.check_fits`): a knob the family lacks or a
    block size that does not divide a layer fails here, as a :class:`UsageError`, with no
    weights loaded."""
    from surm.harness.runs import skeleton

    try:
        skeleton.check_fits(spec, spec.adapter_config())
    except ValueError as err:
        raise UsageError(str(err)) from None


# --------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> dict:
    """Run ``surm finetune``; prints a summary and returns the results record (as JSON)."""
    import torch.distributed as dist

    from surm.harness.runs import execute
    from surm.harness.runs.saving import save_weights, write_results

    spec = spec_from_args(args)
    name = None if args.adapter_config is None else _config_name(args.adapter_config)
    slug = spec.slug if name is None else f"{spec.replace(adapter=None).slug}-{name}"
    out = args.output_dir or default_dir("finetune") / slug
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and spec.modality != "causal_lm":
        raise UsageError("torchrun: surm finetune trains causal LMs in several processes; run classifiers in one")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        record, model, _ = execute(spec, progress=not args.quiet)
        result = {**record.to_json(), "world_size": world}
        if spec.adapter is not None:  # the method string labels the run; the config (in the key) tells runs apart
            result.update(label=f"{record.label} ({name})", adapter_config=json.loads(spec.adapter))
        if world == 1 or dist.get_rank() == 0:
            if not args.no_save:
                result["saved"] = str(save_weights(model, spec, record.label_names, out))
            write_results(result, out)
            print(summary(result, out))
        return result
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _config_name(path: Path) -> str:
    """A short name for an adapter config file: its stem, or its folder's name for
    ``adapter_config.json``."""
    path = path.resolve()
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == "adapter_config.json" else path.stem


def summary(record: dict, out: Path) -> str:
    """A few lines for the terminal."""
    causal = record["num_labels"] == 0
    lr = f"{record['lr']:g}" + (f" (head {record['head_lr']:g})" if record.get("head_lr") is not None else "")
    procs = f", {record['world_size']} processes" if record.get("world_size", 1) > 1 else ""
    lines = [f"{record['label']} on {record['spec']['model']} / {record['spec']['dataset']} "
             f"({record['sizes']['train']} training examples, lr {lr}, {record['train']['steps']} steps, "
             f"seed {record['spec']['seed']}{procs})"]
    for split in ("validation", "test"):
        if split not in record:
            continue
        m = record[split]
        if causal:
            lines.append(f"  {split:<10} loss {m['loss']:.4f}   perplexity {m['perplexity']:.2f}   "
                         f"({m['n']} examples, {m['tokens']} response tokens)")
        else:
            lines.append(f"  {split:<10} accuracy {100 * m['accuracy']:.2f} %   macro-F1 {100 * m['macro_f1']:.2f} %   "
                         f"(n={m['n']})")
    if causal and record.get("curve"):
        start = record["curve"][0]
        lines.append(f"  before training: validation loss {start['loss']:.4f}, perplexity {start['perplexity']:.2f}")
    lines.append(f"  trainable parameters {record['trainable_params']:,}"
                 + ("" if causal else f" ({record['adapter_params']:,} without the head)"))
    steps = max(1, record["train"]["steps"])
    lines.append(f"  train time {record['train_seconds']:.1f} s ({record['train_seconds'] / steps:.2f} s/step), eval "
                 f"{record['eval_seconds']:.1f} s; peak memory {record['peak_memory_mb']:.0f} MiB "
                 f"(+{record['peak_memory_growth_mb']:.0f} MiB while training; {record['memory_measure']})")
    lines.append(f"  results: {out / 'results.json'}" + (f"; weights: {record['saved']}" if "saved" in record else ""))
    return "\n".join(lines)
