"""``SurmLayer``: a target layer wrapped with one or more SURM adapters.

Supported base layers, all linear maps over a feature axis:

==================  ==========================  ============  ==========================
base layer          weight layout               feature axis  as a matrix W (out, in)
==================  ==========================  ============  ==========================
``nn.Linear``       (out, in)                   last          weight
transformers Conv1D (in, out)                   last          weight.T
1x1 ``nn.Conv2d``   (out, in, 1, 1)             1 (channels)  weight[:, :, 0, 0]
==================  ==========================  ============  ==========================

Several active adapters are summed: parallel ones each add ``alpha * S(dropout(x))`` to the
base output; serial ones each add ``act(alpha * S(dropout(h))) + beta`` where ``h`` is the
output of the base layer plus all parallel adapters. Nothing is added in place.

A single active parallel adapter without active dropout on a Linear or Conv1D layer runs through
:func:`surm.structured.parallel_linear`: either the plain path above or the fused one,
``F.linear(x, W0 + alpha * S, b0)`` with a structure-aware backward, whichever is faster for
the layer's shape and the batch's token count (``SurmConfig.fused`` forces one). A merged
weight of 32 MiB or more goes into ``merge_workspace``: one m x n buffer per thread, shared by
the layers of one shape, freed with them or by :func:`surm.structured.release_merge_workspaces`.

A serial ``low_rank`` adapter ``S = B A`` puts its nonlinearity inside the bottleneck,
``alpha * B act(A dropout(h) + c) + beta`` with a bottleneck bias c: exactly the
Houlsby/Pfeiffer bottleneck adapter (2*d*r + r + d parameters).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from surm import structured

from . import mixed, quantized
from .config import SurmConfig
from .scaling import update_scale

_ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda h: h,
}


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'conv2d' for supported layers, None otherwise (an HQQ ``HQQLinear`` is
    a linear layer without a ``weight``: see :mod:`.quantized`)."""
    if isinstance(module, nn.Linear) or quantized.is_hqq(module):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot carry a SURM adapter, or None if it can."""
    kind = layer_kind(module)
    if kind is None:
        return (
            f"{type(module).__name__} layers are not supported; SURM adapts nn.Linear (plain or quantized by "
            f"bitsandbytes or torchao), HQQ's HQQLinear, transformers Conv1D and 1x1 nn.Conv2d layers"
        )
    if kind == "conv2d":
        pointwise = (
            module.kernel_size == (1, 1)
            and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid")
            and module.groups == 1
        )
        if not pointwise:
            return (
                f"Conv2d(kernel_size={module.kernel_size}, stride={module.stride}, padding={module.padding}, "
                f"groups={module.groups}) is not a pointwise convolution; SURM adapts only 1x1 convolutions "
                f"with stride 1, no padding and groups=1 (a linear map over channels)"
            )
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_channels, module.out_channels


def get_matrix(module: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) matrix (a view where possible)."""
    return matrix_of(module, module.weight)


def matrix_of(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``module``'s weight (the weight itself, or its gradient) as an
    (out, in) matrix (a view where possible)."""
    return _weight_matrix(layer_kind(module), tensor)


def _weight_matrix(kind: str, w: torch.Tensor) -> torch.Tensor:
    """A base weight tensor of a layer of ``kind`` as an (out, in) matrix."""
    return w if kind == "linear" else (w.T if kind == "conv1d" else w[:, :, 0, 0])


def _like(saved: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """A tensor saved at merge time on ``current``'s device and in its dtype: the model may have
    been moved or cast (``model.to(...)``, ``.double()``) since."""
    return saved.to(device=current.device, dtype=current.dtype)


def set_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the base weight, in the weight's dtype and layout."""
    kind = layer_kind(module)
    w = module.weight
    new = matrix if kind == "linear" else (matrix.T if kind == "conv1d" else matrix[:, :, None, None])
    w.data = new.to(w.dtype).contiguous()


def adapter_signature(
    S: structured.StructuredMatrix, placement: str, alpha: float | None = None
) -> dict[str, Any]:
    """What the tensors of an adapter are: its family, resolved knobs, placement and the user's
    ``alpha``. Saved with the weights (the ``surm_signature`` buffer), so that a config naming
    another family with the same tensor shapes, or another alpha, is refused on load instead of
    silently computing something else."""
    signature = {"structure": S.name, "placement": placement, **S.knobs()}
    if alpha is not None:
        signature["alpha"] = float(alpha)
    return json.loads(json.dumps(signature))


def signatures_agree(saved: dict[str, Any], built: dict[str, Any]) -> bool:
    """Whether a saved signature describes what the config builds. Files saved before alpha was
    recorded have none: then alpha is not compared."""
    if "alpha" not in saved:
        built = {k: v for k, v in built.items() if k != "alpha"}
    return saved == built


def encode_signature(signature: dict[str, Any], device: torch.device | None = None) -> torch.Tensor:
    """A signature as a uint8 tensor of its sorted JSON text."""
    data = json.dumps(signature, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def side_tensor_shapes(S: structured.StructuredMatrix, placement: str) -> dict[str, tuple[int, ...]]:
    """The adapter's tensors besides S's parameters, by store: a serial adapter's bias beta
    ``surm_bias`` (m,), and a serial low-rank bottleneck's inner bias ``surm_inner_bias`` (rank,)."""
    if placement != "serial":
        return {}
    shapes = {"surm_bias": (S.out_features,)}
    if isinstance(S, structured.LowRank):
        shapes["surm_inner_bias"] = (S.rank,)
    return shapes


def check_adapter_name(name: Any) -> None:
    """An adapter name becomes a module key (``surm_matrix.<name>``) and, in ``save_pretrained``,
    a folder name: refuse one that is empty or holds a dot or a path separator (``"../x"``,
    ``"a/b"``), before anything is built."""
    if isinstance(name, str) and name and not any(c in name for c in "./\\") and name != mixed.BASE:
        return
    raise ValueError(
        f"surm: adapter name {name!r} cannot be used: it becomes a module key and a folder of save_pretrained, so "
        f"it must be a non-empty string without '.', '/' or '\\' (and not {mixed.BASE!r}, which selects the base "
        f"model in mixed batches). Use a plain name such as 'task_a'."
    )


class DamagedSignatureError(ValueError):
    """A saved ``surm_signature`` tensor that is not the uint8 JSON text surm writes."""


#: a signature is a few hundred bytes of JSON; a longer one is not what surm wrote
MAX_SIGNATURE_BYTES = 4096


def _signature_repair(key: str) -> str:
    return (
        f"the adapter file is damaged or was converted by a tool that cast every tensor (e.g. "
        f"{{k: v.half() for k, v in sd.items()}}). Repair it by casting only floating-point tensors "
        f"(leave the uint8 signatures as saved), or delete the '{key}' entries to load without the check."
    )


def check_signature_layout(dtype: torch.dtype | str, shape: tuple[int, ...], key: str) -> None:
    """Refuse a saved signature that is not a uint8 vector of at most ``MAX_SIGNATURE_BYTES``
    bytes (:class:`DamagedSignatureError`): read from a file's header, before its bytes are."""
    if dtype != torch.uint8 or len(shape) != 1:
        raise DamagedSignatureError(
            f"surm: {key} is a {dtype} tensor of shape {shape}, not a uint8 vector: {_signature_repair(key)}"
        )
    if shape[0] > MAX_SIGNATURE_BYTES:
        raise DamagedSignatureError(
            f"surm: {key} holds {shape[0]} bytes; a SURM signature is JSON text of at most {MAX_SIGNATURE_BYTES}: "
            f"{_signature_repair(key)}"
        )


def decode_signature(tensor: torch.Tensor, key: str = "surm_signature") -> dict[str, Any]:
    """The signature dict of a uint8 (L,) tensor of JSON text. Anything else (another dtype,
    as left by a tool that cast every tensor, or bytes that are not JSON) raises
    :class:`DamagedSignatureError` naming ``key`` and the repair."""
    fix = _signature_repair(key)
    if not isinstance(tensor, torch.Tensor):
        raise DamagedSignatureError(f"surm: {key} is a {type(tensor).__name__}, not a uint8 vector: {fix}")
    check_signature_layout(tensor.dtype, tuple(tensor.shape), key)
    try:
        signature = json.loads(bytes(tensor.cpu().tolist()).decode())
    except (UnicodeDecodeError, ValueError):
        raise DamagedSignatureError(f"surm: {key} does not hold JSON text: {fix}") from None
    if not isinstance(signature, dict) or not {"structure", "placement"} <= set(signature):
        raise DamagedSignatureError(f"surm: {key} is not a SURM signature: {fix}")
    return signature


class SurmLayer(nn.Module, BaseTunerLayer):
    """A supported base layer plus SURM adapters (see the module docstring)."""

    adapter_layer_names = ("surm_matrix", "surm_bias", "surm_inner_bias")
    other_param_names = (
        "surm_alpha", "surm_bias_scale", "surm_placement", "surm_activation", "surm_dropout", "surm_fused",
        "surm_signature",
    )

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SurmConfig,
        knobs: dict[str, Any],
        structure: str | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        base = self.get_base_layer()
        reason = unsupported_reason(base)
        if reason:
            raise TypeError(f"surm: {reason}")
        self.kind = layer_kind(base)
        self.in_features, self.out_features = features(base)
        self.surm_matrix = nn.ModuleDict()
        self.surm_bias = nn.ParameterDict()
        self.surm_inner_bias = nn.ParameterDict()
        self.surm_dropout = nn.ModuleDict()
        self.surm_alpha: dict[str, float] = {}
        self.surm_bias_scale: dict[str, float] = {}
        self.surm_placement: dict[str, str] = {}
        self.surm_activation: dict[str, str] = {}
        self.surm_fused: dict[str, bool | None] = {}
        self.surm_signature = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self._merge_snapshot: dict[str, Any] | None = None
        #: after a merge into a quantized weight: its rounding against the exact merge
        self.merge_rounding: quantized.Rounding | None = None
        #: the fused path's merge buffers (one per thread, made on first use, not saved), shared by the
        #: layers of this shape and freed with the last of them; see :class:`surm.structured.MergeWorkspace`
        self.merge_workspace = structured.MergeWorkspace.shared((self.out_features, self.in_features))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, knobs, structure=structure)

    # -- building ----------------------------------------------------------------------
    def adapter_shape(self, placement: str) -> tuple[int, int]:
        """(out, in) of S: the layer's own shape in parallel, (out, out) in serial."""
        if placement == "serial":
            return self.out_features, self.out_features
        return self.out_features, self.in_features

    def update_layer(
        self, adapter_name: str, config: SurmConfig, knobs: dict[str, Any], structure: str | None = None,
        reactivate: bool = True,
    ) -> None:
        """Add adapter ``adapter_name``: a ``structure`` matrix (default: ``config.structure``;
        the tuner passes the module's own, ``config.structure_for(name)``) with ``knobs``.
        ``reactivate=False`` sets only the new adapter's ``requires_grad`` instead of calling
        ``set_adapter`` over every adapter of the layer (loading many adapters stays linear)."""
        weight = quantized.stored_weight(self.get_base_layer())
        # The adapter takes the base weight's floating dtype (for a quantized weight: the dtype it
        # stands for). PEFT then raises half precision to float32 unless get_peft_model(...,
        # autocast_adapter_dtype=False); either way the FFTs run in a float32 island.
        dtype = quantized.float_dtype(self.get_base_layer())
        device = weight.device if weight.device.type != "meta" else None
        m, n = self.adapter_shape(config.placement)
        self.surm_matrix[adapter_name] = structured.make(
            structure or config.structure, m, n, init=config.init, dtype=dtype, device=device, **knobs
        )
        for store, shape in side_tensor_shapes(self.surm_matrix[adapter_name], config.placement).items():
            getattr(self, store)[adapter_name] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.surm_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        scale = update_scale(self.surm_matrix[adapter_name], config.scaling)
        self.surm_alpha[adapter_name] = float(config.alpha) * scale
        # a serial adapter's bias beta enters as scale * beta: under Adam it then moves the
        # output by about lr * scale per step, as S does, instead of lr (1 without the scale)
        self.surm_bias_scale[adapter_name] = scale
        self.surm_placement[adapter_name] = config.placement
        self.surm_activation[adapter_name] = config.activation
        self.surm_fused[adapter_name] = config.fused
        self.surm_signature[adapter_name] = encode_signature(
            adapter_signature(self.surm_matrix[adapter_name], config.placement, config.alpha), device
        )
        if reactivate:
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        else:
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            for tensor in self._adapter_tensors(adapter_name):
                tensor.requires_grad_(trainable)

    def is_bottleneck(self, adapter: str) -> bool:
        """A serial low-rank adapter: the Houlsby/Pfeiffer bottleneck form."""
        return isinstance(self.surm_matrix[adapter], structured.LowRank) and adapter in self.surm_bias

    # -- forward -----------------------------------------------------------------------
    def _features_last(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn`` (..., features) -> (..., features') along the layer's feature axis."""
        if self.kind == "conv2d":
            return fn(x.movedim(1, -1)).movedim(-1, 1)
        return fn(x)

    def _can_fuse(self, adapter: str) -> bool:
        """The fused path needs S to see the same input as W0 (no active dropout) and a plain
        (out, in) weight: Linear or Conv1D with a plain float weight (not quantized, no tensor
        subclass); a quantized layer runs its own matmul and the adapter is added beside it."""
        dropout_active = self.training and isinstance(self.surm_dropout[adapter], nn.Dropout)
        plain = quantized.has_plain_dense_weight(self.get_base_layer())
        return self.kind in ("linear", "conv1d") and not dropout_active and plain

    def _parallel_update(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """alpha * S(dropout(x)) along the feature axis."""
        S, alpha = self.surm_matrix[adapter], self.surm_alpha[adapter]
        return self._features_last(self.surm_dropout[adapter](x), lambda v: alpha * S(v))

    def _serial_update(self, adapter: str, h: torch.Tensor) -> torch.Tensor:
        """act(alpha * S(dropout(h))) + beta, or alpha * B act(A dropout(h) + c) + beta for a bottleneck
        (beta: the bias times its scale, ``surm_bias_scale``)."""
        S, alpha = self.surm_matrix[adapter], self.surm_alpha[adapter]
        act = _ACTIVATIONS[self.surm_activation[adapter]]
        beta = self.surm_bias_scale[adapter] * self.surm_bias[adapter]
        if self.is_bottleneck(adapter):
            c = self.surm_inner_bias[adapter]

            def update(v: torch.Tensor) -> torch.Tensor:
                v = v.to(S.A.dtype)
                return alpha * (act(v @ S.A.T + c) @ S.B.T) + beta

        else:

            def update(v: torch.Tensor) -> torch.Tensor:
                return act(alpha * S(v)).to(beta.dtype) + beta

        return self._features_last(self.surm_dropout[adapter](h), update)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            mixed.check_layer_call(self, x, adapter_names)
            if not self.disable_adapters:
                return mixed.mixed_forward(self, x, adapter_names, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.surm_matrix]
        parallel = [a for a in active if self.surm_placement[a] == "parallel"]
        if len(parallel) == 1 and not args and not kwargs and self._can_fuse(parallel[0]):
            a = parallel[0]
            base = self.get_base_layer()
            result = structured.parallel_linear(
                x, get_matrix(base), base.bias, self.surm_matrix[a], self.surm_alpha[a], fused=self.surm_fused[a],
                workspace=self.merge_workspace,
            )
        else:
            result = self.base_layer(x, *args, **kwargs)
            for a in parallel:
                result = result + self._parallel_update(a, x).to(result.dtype)
        h = result
        for a in active:
            if self.surm_placement[a] == "serial":
                result = result + self._serial_update(a, h).to(result.dtype)
        return result

    # -- merging -----------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """alpha * S.dense() of a parallel adapter in the base weight's dtype and layout, as
        PEFT expects (``weight + delta`` is the merged weight): (out, in) for Linear, (in, out)
        for Conv1D, (out, in, 1, 1) for a 1x1 Conv2d; in the floating dtype a quantized weight
        stands for (see :func:`.quantized.float_dtype`)."""
        if self.surm_placement[adapter] != "parallel":
            raise ValueError(f"surm: adapter {adapter!r} is serial; it has no additive delta weight")
        delta = self.surm_alpha[adapter] * self.surm_matrix[adapter].dense()
        delta = delta if self.kind == "linear" else (delta.T if self.kind == "conv1d" else delta[:, :, None, None])
        return delta.to(quantized.float_dtype(self.get_base_layer()))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight: parallel ``W += alpha S``; serial (identity
        activation only) ``W <- (I + sum alpha S) W_h``, ``b <- (I + sum alpha S) b_h + sum beta``
        where ``W_h, b_h`` is the base plus every merged parallel adapter: serial adapters are
        summed, not chained, so merging them one call at a time or all in one call gives the
        same weights. In a layer with a mergeable serial adapter every merge is recomputed from
        the original weights, saved at the first merge, which :meth:`unmerge` restores exactly.

        A quantized base weight (see :mod:`.quantized`) is dequantized, merged as above and
        requantized in its own format, always from the saved original: the rounding against the
        exact merge is reported (a :class:`.quantized.QuantizedMergeWarning`, and
        ``merge_rounding``) and :meth:`unmerge` puts the original quantized weight back. Formats
        that cannot be requantized (torchao) are refused before anything changes."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.surm_matrix]
        if not names:
            return
        problem = quantized.merge_problem(self.get_base_layer())
        if problem:
            raise ValueError(f"surm: cannot merge into this {type(self.get_base_layer()).__name__}: {problem}.")
        for a in names:
            if self.surm_placement[a] == "serial" and self.surm_activation[a] != "identity":
                raise ValueError(
                    f"surm: cannot merge serial adapter {a!r}: its activation {self.surm_activation[a]!r} is "
                    f"not linear, so h + act(S h) + beta is not a linear layer. Only serial adapters with "
                    f"activation='identity' merge; keep this one unmerged (or use placement='parallel')."
                )
        dense = quantized.weight_format(self.get_base_layer()) == "dense"
        if self._merge_snapshot is None and not self._has_mergeable_serial() and dense:
            self._merge_parallel(names, safe_merge)
        else:
            self._merge_from_snapshot(names, safe_merge)
        self.merged_adapters.extend(names)

    def _has_mergeable_serial(self) -> bool:
        """Whether a serial adapter that can merge lives here: then every merge keeps the
        original weights (one copy), so that any order of merges is exact and unmerge restores
        them bit for bit. Layers with parallel adapters only merge by addition, as LoRA."""
        return any(
            self.surm_placement[a] == "serial" and self.surm_activation[a] == "identity" for a in self.surm_matrix
        )

    def _merge_parallel(self, names: list[str], safe_merge: bool) -> None:
        """``W += sum alpha S`` in place of the base weight (undone by subtraction)."""
        base = self.get_base_layer()
        W = get_matrix(base)
        compute = torch.promote_types(W.dtype, torch.float32)
        new_W = W.to(compute)
        for a in names:
            new_W = new_W + self.surm_alpha[a] * self.surm_matrix[a].dense().detach().to(compute)
        if safe_merge:
            self._check_finite(names, new_W)
        set_matrix(base, new_W)

    def _merge_from_snapshot(self, names: list[str], safe_merge: bool) -> None:
        """Serial merges: rebuild W and b from the saved pre-serial weights and every adapter
        merged since, so the result does not depend on how the merges were grouped. Quantized
        weights come here for parallel merges too: the saved original is the quantized weight
        object itself (:class:`.quantized.Saved`), dequantized for each merge."""
        base = self.get_base_layer()
        dense = quantized.weight_format(base) == "dense"
        snap = self._merge_snapshot or {
            "names": [],
            "weight": base.weight.data.clone() if dense else quantized.save(base),
            "bias": None if base.bias is None else base.bias.data.clone(),
        }
        merged = snap["names"] + names
        if dense:
            W0 = _weight_matrix(self.kind, _like(snap["weight"], base.weight))
        else:
            W0 = quantized.dequantized(base, torch.float32, saved=snap["weight"])
        compute = torch.promote_types(W0.dtype, torch.float32)
        float_ref = base.weight if dense else W0
        m = self.out_features
        W_h = W0.to(compute)
        b_h = _like(snap["bias"], float_ref).to(compute) if snap["bias"] is not None else W_h.new_zeros(m)
        serial = []
        for a in (a for a in self.surm_matrix if a in merged):  # a fixed order: any grouping, same sums
            if self.surm_placement[a] == "parallel":
                W_h = W_h + self.surm_alpha[a] * self.surm_matrix[a].dense().detach().to(compute)
            else:
                serial.append(a)
        M = torch.eye(m, dtype=compute, device=W_h.device)
        for a in serial:
            M = M + self.surm_alpha[a] * self.surm_matrix[a].dense().detach().to(compute)
        new_W = M @ W_h
        new_b = M @ b_h
        for a in serial:
            new_b = new_b + self._serial_offset(a).to(compute)
        if safe_merge:
            self._check_finite(names, new_W, new_b)
        self._merge_snapshot = {**snap, "names": merged}
        if base.bias is None:
            base.bias = nn.Parameter(new_b.to(quantized.float_dtype(base)), requires_grad=False)
        else:
            base.bias.data = new_b.to(base.bias.dtype)
        if dense:
            set_matrix(base, new_W)
            return
        quantized.requantize(base, new_W)
        self.merge_rounding = quantized.rounding(base, new_W, new_W - W0)
        quantized.report(self, self.merge_rounding)

    def _check_finite(self, names: list[str], *merged: torch.Tensor) -> None:
        """PEFT's safe-merge error (same wording as LoRA's), naming the broken adapter."""
        if all(torch.isfinite(t).all() for t in merged):
            return
        broken = [a for a in names if not all(torch.isfinite(p).all() for p in self._adapter_tensors(a))]
        raise ValueError(
            f"NaNs detected in the merged weights. The adapter {', '.join(broken or names)} seems to be broken"
        )

    def _adapter_tensors(self, adapter: str) -> list[torch.Tensor]:
        tensors = list(self.surm_matrix[adapter].parameters())
        for store in (self.surm_bias, self.surm_inner_bias):
            if adapter in store:
                tensors.append(store[adapter])
        return tensors

    def _serial_offset(self, adapter: str) -> torch.Tensor:
        """The constant term of a linear serial adapter: beta (+ alpha * B c for a bottleneck)."""
        offset = self.surm_bias_scale[adapter] * self.surm_bias[adapter].detach()
        if self.is_bottleneck(adapter):
            B = self.surm_matrix[adapter].B.detach()
            offset = offset + self.surm_alpha[adapter] * (B @ self.surm_inner_bias[adapter].detach())
        return offset

    def unmerge(self) -> None:
        """Undo all merges: parallel deltas are subtracted; a serial merge restores the weights
        saved when it was made."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        if self._merge_snapshot is not None:
            snap, self._merge_snapshot = self._merge_snapshot, None
            if isinstance(snap["weight"], quantized.Saved):
                quantized.restore(base, snap["weight"])
                self.merge_rounding = None
            else:
                base.weight.data = _like(snap["weight"], base.weight)
            if snap["bias"] is None:
                base.bias = None
            else:
                base.bias.data = _like(snap["bias"], base.bias)
            self.merged_adapters = [a for a in self.merged_adapters if a not in snap["names"]]
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            W = get_matrix(base)
            delta = self.surm_alpha[a] * self.surm_matrix[a].dense().detach()
            set_matrix(base, W.to(torch.promote_types(W.dtype, delta.dtype)) - delta)

    def __repr__(self) -> str:
        return "surm." + super().__repr__()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether PEFT's ``convert_to_lora`` can export this adapter: parallel ones (additive,
        ``dW = alpha S``) on Linear/Conv1D layers; otherwise warns why (see :mod:`.lora_export`)."""
        from .lora_export import lora_conversion_problem

        problem = lora_conversion_problem(self, adapter_name)
        if problem:
            warnings.warn(problem, stacklevel=2)
        return problem is None
