r"""Examples/s of the input pipeline alone, and of a distillation step.

  python experiments/input_pipeline/benchmark.py            # ~3 min on 2 cores
  python experiments/input_pipeline/benchmark.py --skip_steps  # pipeline only

Part 1 times `kd_jax.input_pipeline.get_datasets(config).train`: host numpy
batches, nothing consuming them, after a warm-up of more than one epoch (so
the in-memory cache is full), for mnist5k (the Hinton MLP setting: batch 256,
+-2 px jitter) and for CIFAR-shaped 32x32x3 data at batch 128 with CIFAR
augmentation (a folder of 5,000 PNG files written to a temp dir, and mnist5k
resized to 32x32x3), and the time to the first batch of a run resumed at
step 100,000 (the stream skips less than one epoch). Part 2 times one jitted distillation step on the same
batch shapes (frozen teacher forward, student forward and backward, SGD
update) for the Hinton MLP pair 2x1200 -> 2x800 and the CIFAR ResNet pair
resnet32x4 -> resnet8x4, and prints the ratio the pipeline has to spare.
experiments/input_pipeline/README.md records the figures.
"""

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from kd_jax import config_lib
from kd_jax import input_pipeline
from kd_jax import models


def write_cifar_shaped_folder(root: str, per_class: int = 500) -> str:
  """10 classes of random 32x32x3 PNG files in root/{train,test}/<class>/."""
  rng = np.random.default_rng(0)
  for split, count in (('train', per_class), ('test', per_class // 5)):
    for cls in range(10):
      folder = os.path.join(root, split, f'class{cls}')
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(folder, f'{i:04d}.png'),
                         tf.io.encode_png(image))
  return root


def pipeline_examples_per_second(config, num_batches: int,
                                 warmup_examples: int) -> tuple[float, float]:
  """(seconds to the first batch, steady-state examples/s) of a train stream."""
  start = time.perf_counter()
  train = input_pipeline.get_datasets(config, num_devices=1).train
  next(train)
  startup = time.perf_counter() - start
  for _ in range(-(-warmup_examples // config.batch_size)):
    next(train)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(train)
  return startup, num_batches * config.batch_size / (
      time.perf_counter() - start)


def step_examples_per_second(teacher_spec, student_spec, image_shape,
                             batch_size: int, num_steps: int) -> float:
  """Examples/s of a jitted distillation step: teacher fwd, student fwd+bwd."""
  teacher = models.get_model(teacher_spec, 10)
  student = models.get_model(student_spec, 10)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch_size, *image_shape)), jnp.float32)
  labels = jnp.arange(batch_size) % 10
  teacher_vars = teacher.init(jax.random.key(0), images[:1])
  student_vars = student.init(jax.random.key(1), images[:1])
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(student_vars['params'])

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(student_vars, opt_state, images, labels, rng):
    teacher_logits = teacher.apply(teacher_vars, images, False)

    def loss_fn(params):
      logits, updates = student.apply(
          {**student_vars, 'params': params}, images, True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      soft = optax.softmax_cross_entropy(
          logits / 4.0, jax.nn.softmax(teacher_logits / 4.0)) * 16.0
      hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(0.9 * soft + 0.1 * hard), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(student_vars['params'])
    changes, opt_state = tx.update(grads, opt_state, student_vars['params'])
    params = optax.apply_updates(student_vars['params'], changes)
    return {**student_vars, **updates, 'params': params}, opt_state

  rng = jax.random.key(2)
  for _ in range(2):  # Compile and warm up.
    student_vars, opt_state = step(student_vars, opt_state, images, labels,
                                   rng)
  jax.block_until_ready(student_vars)
  start = time.perf_counter()
  for _ in range(num_steps):
    student_vars, opt_state = step(student_vars, opt_state, images, labels,
                                   rng)
  jax.block_until_ready(student_vars)
  return num_steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data_dir (default: a fresh temp dir).')
  parser.add_argument('--batches', type=int, default=400,
                      help='timed batches per pipeline setting.')
  parser.add_argument('--skip_steps', action='store_true',
                      help='time the pipeline only.')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='kd_jax_bench_')
  data_dir = args.data_dir or os.path.join(work, 'tfds')
  folder = write_cifar_shaped_folder(os.path.join(work, 'cifar_shaped'))

  def config(dataset, batch_size, augment, **fields):
    c = config_lib.default_config()
    c.data_dir = data_dir
    c.dataset = dataset
    c.batch_size = batch_size
    c.augment = augment
    c.eval_splits = ('test',)
    for key, value in fields.items():
      setattr(c, key, value)
    return c

  settings = [
      ('mnist5k 28x28x1, none, b=256', config('mnist5k', 256, 'none'), 4000),
      ('mnist5k 28x28x1, mnist_jitter, b=256',
       config('mnist5k', 256, 'mnist_jitter'), 4000),
      ('mnist5k 28x28x1, mnist_jitter + mixup, b=256',
       config('mnist5k', 256, 'mnist_jitter', mixup_alpha=1.0), 4000),
      ('folder 32x32x3 PNG, cifar, b=128',
       config('image_folder', 128, 'cifar', image_folder=folder), 5000),
      ('folder 32x32x3 PNG, cifar + mixup, b=128',
       config('image_folder', 128, 'cifar', image_folder=folder,
              mixup_alpha=1.0), 5000),
      ('mnist5k as 32x32x3, cifar, b=128',
       config('mnist5k', 128, 'cifar', image_size=(32, 32), channels=3), 4000),
  ]
  print(f'jax {jax.__version__}, tf {tf.__version__}, {os.cpu_count()} CPU '
        f'cores, JAX backend {jax.default_backend()}')
  print(f'\n{"pipeline setting":46s} {"first batch s":>13s} '
        f'{"examples/s":>12s}')
  delivered = {}
  for name, c, epoch in settings:
    startup, rate = pipeline_examples_per_second(c, args.batches, epoch + 1)
    delivered[name] = rate
    print(f'{name:46s} {startup:13.2f} {rate:12,.0f}')
  resumed = config('mnist5k', 256, 'mnist_jitter')
  start = time.perf_counter()
  next(input_pipeline.get_datasets(resumed, start_step=100_000,
                                   num_devices=1).train)
  print(f'{"mnist5k resumed at step 100,000 (6,400 epochs)":46s} '
        f'{time.perf_counter() - start:13.2f}')
  if args.skip_steps:
    return

  pairs = [
      ('MLP 2x1200 -> 2x800, b=256',
       config_lib.model_config('mlp', hidden=(1200, 1200), dropout=0.5,
                               input_dropout=0.2),
       config_lib.model_config('mlp', hidden=(800, 800)), (28, 28, 1), 256, 50,
       'mnist5k 28x28x1, mnist_jitter, b=256'),
      ('resnet32x4 -> resnet8x4, b=128', config_lib.model_config('resnet32x4'),
       config_lib.model_config('resnet8x4'), (32, 32, 3), 128, 3,
       'folder 32x32x3 PNG, cifar, b=128'),
  ]
  print(f'\n{"distillation step":46s} {"examples/s":>12s} '
        f'{"pipeline / step":>16s}')
  for name, teacher, student, shape, batch, steps, setting in pairs:
    rate = step_examples_per_second(teacher, student, shape, batch, steps)
    print(f'{name:46s} {rate:12,.0f} {delivered[setting] / rate:15.0f}x')


if __name__ == '__main__':
  main()
