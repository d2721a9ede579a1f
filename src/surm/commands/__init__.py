"""The ``surm`` commands, one module each (``approx``, ``finetune``, ``reproduce``, ``bench``),
and :mod:`surm.commands.main`, which puts them together (see its docstring)."""
