"""Merging two networks (Pašen & Boža 2022): concat -> gate -> compress -> fine-tune.

  concat    concat(vars_a, vars_b, spec) -> double-width big student (logits = teachers' mean)
  gates     L0 hard-concrete gates per unit group, gated_apply, lambda schedule
  compress  compress(big_vars, log_alphas, spec) -> (student_vars, keep): best half per group,
            gates folded into the consuming weights
  train     gate learning with the core train_step: GateLoss (CE + lambda L_half), GatedApply,
            one optax.partition optimizer for weights and gates, GateHistory (the gates' open
            probabilities, kept on disk across resumes)
  pipeline  the stages on a dataset: gate_stage, compress_stage (compress + fine-tune),
            shrink (both), merge (concat + shrink)

Functions share their module's name, so import them from the module:
``from mergejax.merging.concat import concat``.
"""

from mergejax.merging import compress, concat, gates, pipeline, train
from mergejax.merging.pipeline import merge

__all__ = ["compress", "concat", "gates", "pipeline", "train", "merge"]
