"""The typed train state: its checkpoint keeps the layout of earlier
versions, so their workdirs resume, and one update per trained group equals
an optimizer per group."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpointing
from kd_jax import optim
from kd_jax import train_state


def feature_state(example_state):
  return train_state.TrainState(
      step=jnp.int32(3), params={'w': jnp.arange(4.0)}, batch_stats={},
      opt_state={'student': {'w': jnp.ones(4)}, 'connectors': {}},
      rng=jax.random.key(1), temperature_params={},
      connector_params={}, connector_batch_stats={},
      example_state=example_state)


@pytest.mark.parametrize('example_state', [
    {}, {'term0': {'labels': jnp.arange(6, dtype=jnp.int32)}}])
def test_a_checkpoint_of_an_earlier_layout_restores_into_the_typed_state(
    tmp_path, monkeypatch, example_state):
  state = feature_state(example_state)
  # Earlier versions saved the per-example state as 'crd_state'.
  earlier = {'crd_state' if k == 'example_state' else k: v
             for k, v in train_state.to_checkpoint(state).items()}
  monkeypatch.setattr(checkpointing, 'STATE_LAYOUT', 1)
  with checkpointing.manager(str(tmp_path), 2) as mngr:
    checkpointing.save(mngr, earlier, {})
  monkeypatch.undo()
  with checkpointing.manager(str(tmp_path), 2) as mngr:
    restored, meta = checkpointing.restore(
        mngr, jax.eval_shape(lambda: state), str(tmp_path))
  assert isinstance(restored, train_state.TrainState)
  assert set(restored.opt_state) == {'student', 'connectors'}
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(restored.replace(rng=None)),
               jax.device_get(state.replace(rng=None)))
  # What it saves now is what it restored, under today's names.
  assert meta['checksum'] == checkpointing.checksum(earlier)
  assert 'example_state' in train_state.to_checkpoint(restored)


def test_one_update_per_group_equals_an_optimizer_per_group():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1),
                   optim.max_norm(0.5))
  params = {'student': {'w': jnp.ones((3, 2))}, 'connectors': {'c': jnp.ones(
      (2, 2))}}
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
  grouped = optim.per_group(tx)
  updates, _ = grouped.update(grads, grouped.init(params), params)
  for group in params:
    alone, _ = tx.update(grads[group], tx.init(params[group]), params[group])
    jax.tree.map(np.testing.assert_array_equal, updates[group], alone)
