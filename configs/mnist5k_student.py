r"""Hinton's MNIST student on mnist5k, trained from scratch: 2x800, no regularisation.

  python -m kd_jax.main --config=configs/mnist5k_student.py \
      --workdir=workdirs/mnist5k_student

The baseline that distillation (configs/mnist5k_distill.py) is measured
against: same model, same data, same steps, no teacher. `:model.hidden=(30,30)`
gives Hinton's tiny 2x30 net.
"""

from kd_jax import config_lib


def get_config(arg=None):
  c = config_lib.default_config()
  c.dataset = 'mnist5k'
  c.train_split = 'train[:3600]'
  c.eval_splits = ('train[3600:]', 'test')  # validation, test.
  c.augment = 'none'
  c.model = config_lib.model_config('mlp', hidden=(800, 800), dropout=0.0)
  c.batch_size = 128
  c.optimizer = 'sgd'
  c.learning_rate = 0.03
  c.momentum = 0.9
  c.schedule = 'cosine'
  c.num_epochs = 60
  c.checkpoint_every_steps = 500
  return config_lib.parse_arg(c, arg)
