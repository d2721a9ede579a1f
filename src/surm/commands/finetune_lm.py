"""``surm finetune`` on a prompt -> response data set: a causal LM (SmolLM2-135M-Instruct, or the
tiny random ``tiny-llama``) fine-tuned through its chat template, the LM head frozen.

``surm finetune`` hands over here when ``--data`` is a causal-LM data set (``grimm_tales``,
``friends``). Writes ``results.json`` (held-out loss and perplexity, the validation curve,
trainable parameters, seconds per step, peak memory) and ``adapter/`` (``save_pretrained``, with
the tokenizer) into ``--output-dir`` (default ``outputs/finetune/<data>-<method>-s<seed>``).

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) it joins a gloo process group and
trains in DistributedDataParallel, each process on its share of every batch; rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from surm.commands.errors import UsageError

#: ``--model`` values for causal-LM data (anything else: a local transformers directory).
MODEL_NAMES = {"smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m", "tiny-llama": "tiny-llama"}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MAX_LENGTH = 256


def plan(args: argparse.Namespace, default_method: str):
    """``(method or adapter config, model name, max_length, TrainConfig)`` from the arguments;
    :class:`UsageError` on a bad method, model or size, before any model is loaded."""
    from surm import methods
    from surm.causal_lm import LLAMA
    from surm.train import TrainConfig

    model = args.model or DEFAULT_MODEL
    model = MODEL_NAMES.get(model, model)
    if model not in MODEL_NAMES.values() and not Path(model).is_dir():
        raise UsageError(f"unknown causal LM {model!r}: choose smollm2-135m, tiny-llama or a local transformers "
                         f"directory")
    if args.adapter_config is not None:
        from surm.commands.finetune import load_adapter_config

        method = load_adapter_config(args.adapter_config)
        lr = args.learning_rate
        if lr is None:
            from surm.peft.recommend import recommended_lr

            lr = recommended_lr(method)
    else:
        try:
            method = methods.parse(args.method or default_method)
            if method.kind in ("head", "bitfit"):
                raise ValueError(f"{method.name} trains a classification head; a causal LM has none here (its LM "
                                 f"head stays frozen): use an adapter method or full")
            lr = args.learning_rate if args.learning_rate is not None else methods.default_lr(method, LLAMA)
        except ValueError as err:
            raise UsageError(err) from None
    if args.head_learning_rate is not None:
        raise UsageError("--head-learning-rate: causal LMs are fine-tuned without a head")
    max_length = args.max_seq_length or DEFAULT_MAX_LENGTH
    if max_length < 2:
        raise UsageError(f"--max-seq-length must be at least 2, got {max_length}")
    epochs, min_steps = args.num_train_epochs, args.min_steps
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
        epochs, min_steps = 0.0, args.max_steps
    config = TrainConfig(lr=lr, epochs=epochs, min_steps=min_steps, batch_size=args.per_device_train_batch_size,
                         weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, seed=args.seed,
                         device=args.device, progress=not args.quiet, eval_batch_size=4)
    return method, model, max_length, config


def run(args: argparse.Namespace, default_method: str) -> dict:
    """Fine-tune, evaluate, save; prints a summary and returns the results (as JSON)."""
    import torch
    import torch.distributed as dist

    from surm import methods
    from surm.causal_lm import LLAMA, InstructionBatcher, finetune_lm
    from surm.experiments.llm import load_model, load_splits
    from surm.outputs import default_dir

    method, model_name, max_length, config = plan(args, default_method)
    label = method.name if isinstance(method, methods.Method) else f"surm:{method.structure} (adapter config)"
    slug = f"{args.data}-{label.split(' ')[0].replace(':', '-').replace('=', '')}-s{args.seed}"
    out = args.output_dir or default_dir("finetune") / slug
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    try:
        key = {"smollm2-135m": "smollm2", "tiny-llama": "tiny-llama"}.get(model_name)
        if key is not None:
            model, tokenizer = load_model(key)
        else:
            from surm.models import load_causal_lm

            model, tokenizer = load_causal_lm(model_name)
        splits = load_splits(args.data, args.seed, args.max_train_samples, args.max_eval_samples or None,
                             args.train_fraction)
        torch.manual_seed(args.seed)  # the adapters' random factors (DDP then starts every rank from rank 0's)
        model = methods.apply(model, method, LLAMA)
        trainable = methods.count_trainable(model)
        batcher = InstructionBatcher(tokenizer, max_length, rank=rank, world_size=world)
        result = finetune_lm(model, batcher, splits, config)
        record = {"model": model_name, "data": args.data, "method": label, "lr": config.lr, "max_length": max_length,
                  "world_size": world, "trainable_params": trainable,
                  "sizes": {s: len(getattr(splits, s).prompts) for s in ("train", "validation", "test")},
                  **result, "config": config.to_dict()}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if not args.no_save:
                record["saved"] = str(_save(model, tokenizer, out))
            (out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
            print(summary(record, out))
        return record
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _save(model, tokenizer, out: Path) -> Path:
    """The adapter (PEFT ``save_pretrained``) and the tokenizer in ``out/adapter``; for full
    fine-tuning the whole model in ``out/model``."""
    import peft

    folder = out / ("adapter" if isinstance(model, peft.PeftModel) else "model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def summary(record: dict, out: Path) -> str:
    """A few lines for the terminal."""
    lines = [f"{record['method']} on {record['model']} / {record['data']} ({record['sizes']['train']} training "
             f"examples, lr {record['lr']:g}, {record['steps']} steps"
             + (f", {record['world_size']} processes" if record["world_size"] > 1 else "") + ")"]
    for split in ("validation", "test"):
        m = record[split]
        lines.append(f"  {split:<10} loss {m['loss']:.4f}   perplexity {m['perplexity']:.2f}   "
                     f"({m['n']} examples, {m['tokens']} response tokens)")
    start = record["curve"][0]
    lines.append(f"  before training: validation loss {start['loss']:.4f}, perplexity {start['perplexity']:.2f}")
    lines.append(f"  trainable parameters {record['trainable_params']:,}")
    lines.append(f"  {record['seconds_per_step']:.2f} s/step; peak memory {record['peak_memory_mb']:.0f} MiB "
                 f"(+{record['peak_memory_growth_mb']:.0f} MiB while training)")
    lines.append(f"  results: {out / 'results.json'}" + (f"; weights: {record['saved']}" if "saved" in record else ""))
    return "\n".join(lines)
