r"""Specialist ensembles (Hinton, Vinyals & Dean 2015, sec. 5) on mnist5k.

A generalist (Hinton's 2x1200 MNIST teacher), specialists for groups of the
classes it confuses, their KL-minimising combination, and one 2x800 student
distilled from that combination. Every run lives under `root` (default
workdirs/specialists_mnist5k); the roles, in order:

  R=workdirs/specialists_mnist5k
  python -m kd_jax.main --config=configs/specialists_mnist5k.py:role=generalist \
      --workdir=$R/generalist
  python -m kd_jax.specialists.cluster \
      --config=configs/specialists_mnist5k.py:role=generalist \
      --workdir=$R/generalist --out=$R/groups.json
  for k in 0 1 2; do
    python -m kd_jax.main \
        --config=configs/specialists_mnist5k.py:role=specialist,specialist.index=$k \
        --workdir=$R/specialist_$k
  done
  python -m kd_jax.specialists.evaluate \
      --config=configs/specialists_mnist5k.py:role=distill --out=$R/combination
  python -m kd_jax.main --config=configs/specialists_mnist5k.py:role=distill \
      --workdir=$R/distill
  python -m kd_jax.main \
      --config=configs/specialists_mnist5k.py:role=distill_generalist \
      --workdir=$R/distill_generalist
  python -m kd_jax.main --config=configs/specialists_mnist5k.py:role=student \
      --workdir=$R/student

Add `root=DIR` to every --config to keep the runs elsewhere. Specialist k
(`specialist.index=k`) starts from the generalist's weights
(`config.init_from`), sees half of its examples from its group and half from
the other classes, and predicts its group's digits plus a dustbin. `distill`
distils the combination (`teacher_source='specialists'`: the generalist,
then the specialists in group order), `distill_generalist` the generalist
alone, `student` trains the same 2x800 net without a teacher. The classes
are clustered at temperature 20 (`specialist.cluster_temperature`): at
temperature 1 or 2 the generalist is so sure on its training digits that
each class's own variance dominates its covariance column and k-means splits
off single digits ({0}, {1} and the rest at 2); at 20 the confusions show
(groups {0, 6}, {3, 5} and the rest).

experiments/specialists/run.py runs all of it (about 7.5 min on 2 CPU cores)
and reports the accuracies and the coverage breakdown; with these settings
the combination is no more accurate than the generalist (96.1% and 96.3%
on the 1,000 test digits); see experiments/specialists/README.md.
"""

from kd_jax import config_lib

GENERALIST = config_lib.model_config('mlp', hidden=(1200, 1200), dropout=0.5,
                                     input_dropout=0.2)
STUDENT = config_lib.model_config('mlp', hidden=(800, 800), dropout=0.0)
ROLES = ('generalist', 'specialist', 'distill', 'distill_generalist',
         'student')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'generalist'
  c.root = 'workdirs/specialists_mnist5k'
  c.dataset = 'mnist5k'
  c.batch_size = 128
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.schedule = 'cosine'
  c.checkpoint_every_steps = 500
  c.specialist.num_groups = 3
  c.specialist.cluster_temperature = 20.0
  c.specialist.top_n = 2
  c.specialist_epochs = 15.0
  config_lib.parse_arg(c, arg)
  return apply_role(c)


def apply_role(c):
  """Sets model, data and teachers for `c.role`, with runs under `c.root`."""
  if c.role not in ROLES:
    raise ValueError(f'config.role={c.role!r}; choose one of {ROLES}, e.g. '
                     '--config=configs/specialists_mnist5k.py:role=student.')
  generalist_dir = f'{c.root}/generalist'
  if c.specialist.groups is None and not c.specialist.groups_file:
    c.specialist.groups_file = f'{c.root}/groups.json'
  if c.role in ('generalist', 'specialist'):
    c.model = GENERALIST
    c.augment = 'mnist_jitter'
    c.learning_rate = 0.1
    c.num_epochs = 60
  else:
    c.model = STUDENT
    c.augment = 'none'
    c.learning_rate = 0.03
    c.num_epochs = 60
  if c.role == 'specialist':
    if c.specialist.index < 0:
      raise ValueError('role=specialist needs config.specialist.index >= 0, '
                       'e.g. :role=specialist,specialist.index=0.')
    c.init_from = generalist_dir
    c.learning_rate = 0.02
    c.num_epochs = c.specialist_epochs
  elif c.specialist.index >= 0:
    raise ValueError(f'config.specialist.index={c.specialist.index} is for '
                     f'role=specialist, not role={c.role}.')
  if c.role == 'distill':
    c.distill.teacher_source = 'specialists'
    c.teachers = [config_lib.teacher_config(GENERALIST, generalist_dir)] + [
        config_lib.teacher_config(GENERALIST, f'{c.root}/specialist_{k}')
        for k in range(c.specialist.num_groups)]
  elif c.role == 'distill_generalist':
    c.distill.teacher_source = 'online'
    c.teachers = [config_lib.teacher_config(GENERALIST, generalist_dir)]
  if c.role in ('distill', 'distill_generalist'):
    c.distill.temperature = 20.0
    c.distill.alpha = 0.9
  return c
