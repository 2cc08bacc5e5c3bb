"""Host batches -> global `jax.Array`s on a mesh, a few batches ahead."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
import itertools
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np


def _is_numeric(x: np.ndarray) -> bool:
  return np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_


def batch_spec(mesh: jax.sharding.Mesh) -> P:
  """Rows split over every axis of `mesh`: each device its own rows."""
  axes = tuple(mesh.axis_names)
  return P(axes[0] if len(axes) == 1 else axes)


def prefetch_to_mesh(iterator: Iterable[dict[str, np.ndarray]],
                     mesh: jax.sharding.Mesh, size: int = 2
                     ) -> Iterator[dict[str, Any]]:
  """Moves batches to devices `size` batches ahead of the consumer.

  Numeric fields become global `jax.Array`s, their rows split over every
  mesh axis (each device its own rows) from each process's local rows;
  others (`id`) stay host numpy.
  """
  sharding = NamedSharding(mesh, batch_spec(mesh))
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append({
          k: (jax.make_array_from_process_local_data(sharding, v)
              if _is_numeric(v) else v) for k, v in batch.items()})

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
