"""One run: what it is (:class:`RunSpec`), doing it (:func:`execute`), what it leaves
(:class:`RunRecord`); the run store and the runner (:mod:`.store`); what produced a run
(:mod:`.provenance`); the meta-device skeleton check (:mod:`.skeleton`)."""

from .execution import delta_names, execute, load_splits, longest_prompt, make_model, planning_batches, train_config
from .spec import DTYPES, RunRecord, RunSpec, adapter_json, steps_setting
from .store import Runner, RunStore

__all__ = [
    "DTYPES",
    "RunRecord",
    "RunSpec",
    "RunStore",
    "Runner",
    "adapter_json",
    "delta_names",
    "execute",
    "load_splits",
    "longest_prompt",
    "make_model",
    "planning_batches",
    "steps_setting",
    "train_config",
]
