"""A run's model on the meta device, to check a method against its layers before any weights load.

``surm finetune``, ``surm plan`` and the :class:`~surm.harness.runs.store.Runner` use it so that a
bad method for a model (a block size that divides no layer, a knob the family lacks, a PEFT
method that cannot adapt convolutions) fails before training starts, not after hours of other
runs.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

__all__ = ["check_fits", "skeleton"]


def skeleton(spec) -> nn.Module:
    """``spec``'s model (a :class:`~surm.harness.runs.spec.RunSpec`), built on the meta device:
    its layers and shapes, no weights (a classifier's head has 2 outputs).

    Raises ValueError: a folder without a transformers config, or a model that is no sequence
    classifier.
    """
    return spec.model_entry.skeleton()


def check_fits(spec, adapter=None) -> None:
    """Apply ``spec``'s method (or ``adapter``, a config) to the skeleton of its model: a knob the
    family lacks or a block size that does not divide a layer fails here, as a ValueError naming
    the method and the model, with no weights loaded."""
    from surm.harness import methods

    model = skeleton(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            methods.apply(model, spec.method if adapter is None else copy.deepcopy(adapter), spec.profile)
    except (ValueError, TypeError) as err:
        what = spec.method.name if adapter is None else "the adapter config"
        raise ValueError(f"{what} on {spec.model}: {err}") from None
