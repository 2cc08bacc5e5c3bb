"""Feature taps: how a model records a named intermediate feature.

A model calls `tap(self, name, value)` at each position a feature method may
read. The value goes to the 'intermediates' collection only when the caller
made that collection mutable (`kd_jax.models.features.apply_with_features`);
a plain `model.apply(variables, images)` ignores it, and `model.init` never
records it, so checkpointed variables hold params and batch statistics only.
"""

import flax.linen as nn
import jax

INTERMEDIATES = 'intermediates'


def tap(module: nn.Module, name: str, value: jax.Array) -> None:
  """Records `value` as feature `name` of `module` when features are asked."""
  if not module.is_initializing():
    module.sow(INTERMEDIATES, name, value)
