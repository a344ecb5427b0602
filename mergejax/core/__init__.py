"""The core every pillar builds on (no imports here; import the submodule you need).

  data        datasets by name, CIFAR augmentation, the seeded batch iterator
  models      Flax Linen models and the one Linen <-> pytree boundary
  units       per-model unit tables: which parameter axes belong to which group of units
  train       TrainState, the one pure ``train_step`` skeleton (loss as an argument), eval sums
  loop        ``fit`` (the host loop: logging, evaluation, checkpoints, exact resume), ``evaluate``
  optim       optax schedules and the optimizer factory, value-equal so equal configs share compiles
  checkpoint  atomic, checksummed orbax checkpoints; a step manager that skips damaged steps
  rundir      run identity: manifests, one-writer locks, resumable units
  trees       pytree helpers: first mismatching leaf, path tuples, stacking, running means
  errors      UserError and friends: one-line errors for people
"""
