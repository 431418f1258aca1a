"""The application layer: the ``cstep`` command line, run assembly and checkpoints, the training loop,
HDF5 run files, the precision study and the figures.

It imports everything (the engine core, ``nets``, ``solvers``, ``data``); nothing outside it imports
it. Modules: :mod:`~engine.app.cli` (parser, entry point), :mod:`~engine.app.commands` (one
function per subcommand), :mod:`~engine.app.options` (defaults and checks), :mod:`~engine.app.runs`
(building, resuming, checkpointing and driving a run), :mod:`~engine.app.train` (the trainer),
:mod:`~engine.app.runfile` (HDF5 run files), :mod:`~engine.app.progress`, :mod:`~engine.app.report`
(what is printed), :mod:`~engine.app.plots` (every figure), :mod:`~engine.app.study` and
:mod:`~engine.app.study_targets` (the precision study).
"""
