"""Pillar 1, averaging (import the submodule you need).

  weights       weight averaging of N pytrees, EMA, interpolation
  parallel      data-parallel train step: the core step under shard_map (pmap kept beside it)
  local_sgd     local SGD / FedAvg / DiLoCo rounds with an outer optax optimizer
  distributed   the 2-process (jax.distributed, CPU) local-SGD run and its 1-process reference
  soups         uniform and greedy model soups
  rebasin       Git Re-Basin weight matching over the unit tables
  connectivity  loss barriers and interpolation paths, naive vs permutation-aligned
  report        the averaging experiment's tables and plots
"""
