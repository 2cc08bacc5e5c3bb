r"""Imports big_vision's own ViTs and BiT, saved as big_vision saves them.

  git clone https://github.com/google-research/big_vision /tmp/bv
  PYTHONPATH=/tmp/bv:. python experiments/interop/verify_big_vision.py \
      [--image_size=224] [--cases=vit-S/16:gap,bit-R50x1] \
      [--big_vision_revision=$(git -C /tmp/bv rev-parse HEAD)]

For each case of `CASES` it builds the model with big_vision's own module
(`big_vision.models.vit.Model` / `big_vision.models.bit.Model`), initialises
it, then redraws every LayerNorm's and GroupNorm's scale (U(0.5, 1.5)) and
every bias (N(0, 0.1)) and draws every zero-initialised tensor (the head's
kernel, the class token, gn3's scale: N(0, 0.02)), so that no tensor is a
no-op whose mapping the comparison would not see. It saves the params as a
flat .npz of '/'-joined tree paths (`big_vision.utils.
tree_flatten_with_names` and `np.savez`, as big_vision's released
checkpoints; the scanned case as a training checkpoint's 'params/' subtree),
imports that file with `kd_jax.import_teacher` into a fresh run directory,
and runs the same --num_images random uint8 images through big_vision's
model (`value_range(-1, 1)`: pixel / 255 * 2 - 1) and the imported run's
serving function (`kd_jax.export_model`, which normalises with the mean and
std the import recorded). It prints, and writes to --out, the largest
|logits - big_vision's logits|, also relative to the largest |big_vision
logit|, and that of the zoo model alone fed big_vision's inputs (no
normalisation of its own).

Needs big_vision on PYTHONPATH (its models import `big_vision.utils`, which
imports TensorFlow, einops and ml_collections: kd_jax's own dependencies);
nothing downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import export_model
from kd_jax import import_teacher

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (kd_jax --model, big_vision module, big_vision model kwargs, form).
CASES = {
    'vit-Ti/16:tok': ('vit-Ti/16', 'vit', dict(variant='Ti/16',
                                               pool_type='tok'), 'params'),
    'vit-Ti/16:gap': ('vit-Ti/16', 'vit', dict(variant='Ti/16',
                                               pool_type='gap'), 'params'),
    'vit-S/16:tok': ('vit-S/16', 'vit', dict(variant='S/16',
                                             pool_type='tok'), 'params'),
    'vit-S/16:gap': ('vit-S/16', 'vit', dict(variant='S/16',
                                             pool_type='gap'), 'params'),
    # big_vision's i1k S/16 baselines (configs/vit_s16_i1k.py).
    'vit-S/16:gap+sincos2d+rep': ('vit-S/16', 'vit', dict(
        variant='S/16', pool_type='gap', posemb='sincos2d', rep_size=True),
                                  'params'),
    # configs/vit_i1k.py's model, trained with scan, as a training checkpoint.
    'vit-Ti/16:tok+rep+scan': ('vit-Ti/16', 'vit', dict(
        variant='Ti/16', pool_type='tok', rep_size=True, scan=True),
                               'checkpoint'),
    'bit-R50x1': ('bit-R50x1', 'bit', dict(depth=50, width=1), 'params'),
}


def build(module: str, kwargs: dict, num_classes: int, image_size: int,
          seed: int):
  """big_vision's model and its params, every tensor drawn (not a no-op)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from big_vision import utils as bv_utils  # pylint: disable=g-import-not-at-top,line-too-long
  bv = importlib.import_module(f'big_vision.models.{module}')
  model = bv.Model(num_classes=num_classes, **kwargs)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(seed), images)['params']
  rng = np.random.default_rng(seed + 1)

  def draw(name, leaf):
    leaf = np.asarray(leaf, np.float32)
    if name.endswith('/scale') and leaf.any():
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name.endswith('/bias'):
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    if not leaf.any():  # Zero-initialised: head kernel, cls, gn3 scale.
      return rng.normal(0, 0.02, leaf.shape).astype(np.float32)
    return leaf
  params = bv_utils.tree_map_with_names(draw, params)
  return model, params


def save(params, path: str, form: str) -> None:
  """As big_vision writes a tree: flat names joined by '/', np.savez."""
  from big_vision import utils as bv_utils  # pylint: disable=g-import-not-at-top,line-too-long
  tree = {'params': params} if form == 'checkpoint' else params
  names_and_vals, _ = bv_utils.tree_flatten_with_names(tree)
  with open(path, 'wb') as f:
    np.savez(f, **{k: np.asarray(v) for k, v in names_and_vals})


def verify(case: str, args, root: str) -> dict:
  name, module, kwargs, form = CASES[case]
  model, params = build(module, kwargs, args.num_classes, args.image_size,
                        args.seed)
  weights = os.path.join(root, f'{case.replace("/", "_")}.npz')
  save(params, weights, form)
  workdir = os.path.join(root, case.replace('/', '_'))
  start = time.time()
  record = import_teacher.import_weights('big_vision', name, weights,
                                         workdir, image_size=args.image_size)
  pixels = np.random.default_rng(args.seed).integers(
      0, 256, (args.num_images, args.image_size, args.image_size, 3),
      np.uint8)
  value_range = pixels.astype(np.float32) / 255.0 * 2.0 - 1.0
  want, _ = jax.jit(model.apply)({'params': params}, value_range)
  want = np.asarray(want)
  run = export_model.load_run(workdir)
  got = np.asarray(jax.jit(export_model.serving_function(run))(pixels))
  # The zoo model alone on big_vision's inputs: no normalisation of its own.
  module_logits = np.asarray(jax.jit(run.model.apply)(run.variables,
                                                       value_range))
  scale = float(np.abs(want).max())
  diff = float(np.abs(got - want).max())
  return dict(case=case, model=name, big_vision_model=module,
              big_vision_kwargs=kwargs, saved_as=form, spec=record['spec'],
              num_params=record['num_params'], max_abs_big_vision_logit=scale,
              max_abs_difference=diff, relative=diff / scale,
              same_argmax=int((got.argmax(-1) == want.argmax(-1)).sum()),
              module_max_abs_difference=float(
                  np.abs(module_logits - want).max()),
              seconds=time.time() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_images', type=int, default=4)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--cases', default='',
                      help=f'comma-separated of {list(CASES)} (default: all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--big_vision_revision', default='',
                      help="the checkout's commit, for the record")
  parser.add_argument('--out', default=os.path.join(
      HERE, 'results_big_vision.json'))
  args = parser.parse_args()
  wanted = [c for c in args.cases.split(',') if c]
  for case in wanted:
    if case not in CASES:
      parser.error(f'--cases: {case!r} is not one of {list(CASES)}')
  import flax  # pylint: disable=g-import-not-at-top
  import big_vision  # pylint: disable=g-import-not-at-top
  checkout = os.path.dirname(os.path.dirname(big_vision.__file__))
  versions = dict(big_vision=args.big_vision_revision or checkout,
                  jax=jax.__version__, flax=flax.__version__)
  print(' '.join(f'{k} {v}' for k, v in versions.items()))
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for case in wanted or CASES:
      row = verify(case, args, root)
      rows.append(row)
      print(f'{case:28s} {row["num_params"]:>11,} params  max|bv logit| '
            f'{row["max_abs_big_vision_logit"]:8.3f}  max|diff| '
            f'{row["max_abs_difference"]:.2e} ({row["relative"]:.1e} rel, '
            f'argmax {row["same_argmax"]}/{args.num_images}; zoo module '
            f'alone {row["module_max_abs_difference"]:.1e})  '
            f'{row["seconds"]:.0f} s', flush=True)
  with open(args.out, 'w') as f:
    json.dump(dict(versions=versions, image_size=args.image_size,
                   num_images=args.num_images, num_classes=args.num_classes,
                   rows=rows), f, indent=2)
  worst = max(row['relative'] for row in rows)
  print(f'largest relative difference {worst:.1e} (target 1e-3)')
  return 0 if worst <= 1e-3 else 1


if __name__ == '__main__':
  sys.exit(main())
