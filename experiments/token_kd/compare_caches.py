"""How two exports of one `kd_jax.lm_cache` cache differ.

  python experiments/token_kd/compare_caches.py A B

For each of the cache's arrays (ids, top-k logits, tail mass): its shape,
how many entries differ and the largest difference in units of float16's
spacing at the first cache's value (ulps). The manifests must agree but for
the teacher's workdir path.
"""

import argparse
import json
import os
import sys

import numpy as np

ARRAYS = ('topk_indices', 'topk_logits', 'rest_mass')


def compare(a: str, b: str) -> dict[str, dict[str, float]]:
  """{array: {entries, differ, max_ulps}} of caches `a` and `b`."""
  manifests = []
  for cache in (a, b):
    with open(os.path.join(cache, 'manifest.json')) as f:
      manifests.append({k: v for k, v in json.load(f).items()
                        if k != 'teacher_workdir'})
  fields = sorted(k for k in set(manifests[0]) | set(manifests[1])
                  if manifests[0].get(k) != manifests[1].get(k))
  if fields:
    raise ValueError(f'{a} and {b} are caches of different exports: their '
                     f'manifests differ in {fields}')
  out = {}
  for name in ARRAYS:
    x, y = (np.load(os.path.join(c, f'{name}.npy'), mmap_mode='r')
            for c in (a, b))
    if x.shape != y.shape:
      raise ValueError(f'{name}.npy: shapes {x.shape} and {y.shape}')
    differ = np.asarray(x != y)
    ulps = 0.0
    if differ.any() and np.issubdtype(x.dtype, np.floating):
      xs, ys = np.asarray(x[differ]), np.asarray(y[differ])
      ulps = float(np.max(np.abs(xs.astype(np.float64) - ys)
                          / np.spacing(np.abs(xs))))
    elif differ.any():
      ulps = float('inf')
    out[name] = dict(shape=list(x.shape), entries=int(x.size),
                     differ=int(differ.sum()), max_ulps=ulps)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('a')
  parser.add_argument('b')
  args = parser.parse_args(argv)
  for name, row in compare(args.a, args.b).items():
    print(f'{name}: shape {tuple(row["shape"])}, {row["differ"]} of '
          f'{row["entries"]} differ, at most {row["max_ulps"]:g} ulp')


if __name__ == '__main__':
  sys.exit(main())
