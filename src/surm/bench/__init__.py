"""Speed and memory benchmarks, run by ``surm bench PART...`` (never as timed tests).

One module per benchmark:

- :mod:`~surm.bench.layers` (``layers``, ``llm``): one linear layer, forward + backward, with
  each fine-tuning method's update (``llm``: at the shapes of SmolLM2-135M and Llama-2-7B,
  against LoRA r=16);
- :mod:`~surm.bench.training_step` (``steps``, ``inference``): MiniLM training steps, and
  inference after ``merge_and_unload``;
- :mod:`~surm.bench.ops` (``ops``): each structured product against a dense matmul;
- :mod:`~surm.bench.fused` (``fused``): the fused parallel layer against the plain one, and
  (``--policy``) the token count where fused starts to win;
- :mod:`~surm.bench.adapters` (``adapters``): SmolLM2-135M with N adapters, batches whose rows
  mix them (``adapter_names``) against one adapter, and loading N saved adapters;
- :mod:`~surm.bench.quantized` (``quantized``): SURM and LoRA training steps and merges on
  float32, bitsandbytes int8 / nf4 and torchao int8 SmolLM2-135M bases.

:mod:`~surm.bench.peft_comparison` runs the first three together; :mod:`~surm.bench.timing`
(interleaved rounds), :mod:`~surm.bench.memory` (saved-for-backward bytes, allocation peaks)
and :mod:`~surm.bench.report` (machine record, tables, JSON) serve them all. Every timing is a
median of interleaved rounds measured in one process, read as a ratio to a reference measured
in the same rounds. This module imports nothing, so the command line can read the names below.
"""

#: The benchmarks, in the order ``surm bench`` runs them.
PARTS = ("layers", "steps", "inference", "ops", "fused", "llm", "adapters", "quantized")
#: The parts ``surm bench`` runs when none is named: SURM against PEFT's LoRA, C3A, LoKr,
#: FourierFT and VeRA.
PEFT_PARTS = ("layers", "steps", "inference")
#: The methods of the PEFT comparison (method strings of :func:`surm.harness.methods.parse`): the
#: floor, the references, PEFT's structured and frugal methods (C3A, LoKr, FourierFT and VeRA at
#: the settings of the text experiment, whose counts match SURM circulant's on every map) and
#: LoRA-FIX, then every SURM family with its default knobs.
DEFAULT_METHODS = (
    "head",
    "lora:8",
    "lorafix:8",
    "c3a:64",
    "c3a:384",
    "lokr:8",
    "fourierft:768",
    "vera:192",
    "surm:circulant",
    "surm:skew_circulant",
    "surm:toeplitz",
    "surm:symmetric_toeplitz",
    "surm:kronecker",
    "surm:ldr:rank=1",
    "surm:ldr:rank=2",
)
#: Always measured: ratios are taken to them (``head`` is the floor, ``lora:8`` the reference).
REFERENCE_METHODS = ("head", "lora:8")
#: The methods of the ``llm`` part: the frozen layer, LoRA r=16 (the usual rank at LLM scale),
#: C3A, every SURM family with its default knobs (LDR at rank 1).
LLM_METHODS = (
    "head",
    "lora:16",
    "c3a:64",
    "surm:circulant",
    "surm:skew_circulant",
    "surm:toeplitz",
    "surm:symmetric_toeplitz",
    "surm:kronecker",
    "surm:ldr:rank=1",
)
#: The references of the ``llm`` part.
LLM_REFERENCE_METHODS = ("head", "lora:16")
#: The base formats of the ``quantized`` part, in the order of its table.
QUANT_FORMATS = ("float32", "bfloat16", "bnb-int8", "bnb-nf4", "torchao-int8")
