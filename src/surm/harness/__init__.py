"""The training harness: everything between the tuner (:mod:`surm.peft`) and the tools on top
(:mod:`surm.experiments`, :mod:`surm.bench`, :mod:`surm.commands`).

* :mod:`.data`: the packaged data sets, a user's own files, chat-template batches;
* :mod:`.models`: the model catalog (name -> loader, skeleton, where adapters go);
* :mod:`.methods`: the method vocabulary (``lora:8``, ``surm:circulant``, ...), one record per kind;
* :mod:`.training`: the training loop, evaluation, memory tracking;
* :mod:`.runs`: one run (spec, execution, record), the run store, provenance;
* :mod:`.progress`, :mod:`.threads`, :mod:`.outputs`: progress bars, torch threads, output folders.

Imports point down only: the harness imports :mod:`surm.peft` and :mod:`surm.structured`, never
the experiments, benchmarks or commands. Nothing heavy is imported here.
"""
