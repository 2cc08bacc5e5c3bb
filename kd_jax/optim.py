"""Optax transforms that kd_jax's optimizers add to optax's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np  # pylint: disable=unused-import  (the doctest uses it)
import optax


def _project(param: jax.Array, limit: float) -> jax.Array:
  if param.ndim < 2:  # Biases and norm scales are not constrained.
    return param
  # Each output unit's incoming weights: every axis but the last.
  axes = tuple(range(param.ndim - 1))
  norms = jnp.sqrt(jnp.sum(jnp.square(param), axis=axes, keepdims=True))
  scale = jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12))
  return param * scale.astype(param.dtype)


def max_norm(limit: float) -> optax.GradientTransformation:
  """Keeps each unit's incoming weight vector within an L2 ball of radius `limit`.

  The max-norm constraint of the dropout nets of Hinton et al. (2012,
  arXiv:1207.0580) and Srivastava et al. (2014, JMLR 15, Sec. 5.1): after every
  update, a kernel's column for output unit j, `w_j` (over all input axes,
  e.g. H x W x C_in for a convolution), is rescaled to `w_j * min(1, c /
  ||w_j||)`. It lets dropout nets train at high learning rates without their
  weights blowing up. 1-D params (biases, norm scales) are left alone.

  It must come last in an `optax.chain`: it turns the updates into the ones
  that land on the projected params.

  >>> params = {'w': jnp.array([[3.0, 0.1], [4.0, 0.1]])}
  >>> tx = max_norm(1.0)
  >>> updates, _ = tx.update({'w': jnp.zeros((2, 2))}, tx.init(params), params)
  >>> print(np.round(np.asarray(optax.apply_updates(params, updates)['w']), 2))
  [[0.6 0.1]
   [0.8 0.1]]

  Args:
    limit: the radius c > 0.

  Returns:
    An optax transform that needs `params` in `update`.
  """
  if not limit > 0:
    raise ValueError(f'max_norm limit={limit} must be > 0.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('max_norm needs the params: call update(updates, state, '
                       'params).')
    updates = jax.tree.map(
        lambda u, p: _project(p + u, limit) - p, updates, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def per_group(tx: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """`tx` applied to each group of a {group: params} tree on its own.

  One update for every trainable group (the student, a learned temperature,
  feature connectors), each with its own state of `tx`: a group's gradient
  clipping and max-norm see that group alone, as if it had its own
  optimizer.

  >>> tx = per_group(optax.chain(optax.clip_by_global_norm(1.0),
  ...                            optax.sgd(1.0)))
  >>> params = {'a': jnp.zeros(1), 'b': jnp.zeros(1)}
  >>> grads = {'a': jnp.array([3.0]), 'b': jnp.array([-0.5])}
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> [float(updates[k][0]) for k in ('a', 'b')]
  [-1.0, 0.5]
  """
  def init_fn(params):
    return {group: tx.init(p) for group, p in params.items()}

  def update_fn(updates, state, params=None):
    out = {group: tx.update(u, state[group],
                            None if params is None else params[group])
           for group, u in updates.items()}
    return ({g: u for g, (u, _) in out.items()},
            {g: s for g, (_, s) in out.items()})

  return optax.GradientTransformation(init_fn, update_fn)
