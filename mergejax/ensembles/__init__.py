"""Pillar 2, collecting: snapshot ensembles, SWA and FGE (FreezeOut is ``mergejax.freezeout``).

  snapshot  cyclic-cosine snapshot collection and vmapped ensemble evaluation
  swa       SWA running average, BatchNorm re-estimation, FGE cycles
"""
