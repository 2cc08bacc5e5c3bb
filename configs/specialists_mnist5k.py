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
      --config=configs/specialists_mnist5k.py:role=distill \
      --split='train[3600:]' --out=$R/combination_validation
  python -m kd_jax.specialists.evaluate \
      --config=configs/specialists_mnist5k.py:role=distill \
      --split=test --out=$R/combination_test
  python -m kd_jax.main --config=configs/specialists_mnist5k.py:role=distill \
      --workdir=$R/distill
  python -m kd_jax.main \
      --config=configs/specialists_mnist5k.py:role=distill_generalist \
      --workdir=$R/distill_generalist
  python -m kd_jax.main --config=configs/specialists_mnist5k.py:role=student \
      --workdir=$R/student

Add `root=DIR` to every --config to keep the runs elsewhere. Every run trains
on `train[:3600]` and evaluates on `train[3600:]` (validation) and `test`.
Each role takes every field of the run it is (data, splits, model, optimiser,
schedule, loss) from the config that owns that recipe (RECIPES): the
generalist is configs/mnist5k_teacher.py's teacher (2x1200, dropout, jitter,
SGD lr 0.02, max-norm 3.5, 150 epochs, chosen on validation in
experiments/teacher_recipe), the three students are
configs/mnist5k_student.py's and configs/mnist5k_distill.py's 2x800 (60
epochs, lr 0.03; T = 20, soft weight 0.9). Specialist k
(`specialist.index=k`) is the generalist's run fine-tuned from its weights
(`config.init_from`) for `specialist_epochs` (15) at lr 0.02, on draws half
from its group and half from the other classes; it predicts its group's
digits plus a dustbin. These specialist settings are the study's own, kept
from its first version: not tuned, on validation or otherwise. `distill`
distils the combination (`teacher_source='specialists'`: the generalist, then
the specialists in group order), `distill_generalist` the generalist alone,
`student` trains the same 2x800 net without a teacher. The classes are
clustered at temperature 20 (`specialist.cluster_temperature`), the
distillation temperature: with the earlier generalist (lr 0.1, 60 epochs)
temperature 1 or 2 split off single digits ({0}, {1} and the rest at 2),
too sure on its training digits for the confusions to show.

experiments/specialists/run.py runs all of it (566 s on the 2-core CPU under
a load average of about 8) and reports validation and test errors. The
combination is no more accurate than the generalist: 7 against 6 errors of
the 400 validation digits, 25 against 26 of the 1,000 test digits (groups
{0, 1, 4, 6}, {2, 7}, {3, 5, 8, 9}); the student distilled from it makes
17 / 40 (validation / test), from the generalist alone 12 / 41, without a
teacher 27 / 59. See experiments/specialists/README.md.
"""

from kd_jax import config_lib

ROLES = ('generalist', 'specialist', 'distill', 'distill_generalist',
         'student')
# The config each role takes its recipe from: every field of
# default_config() (data, splits, model, optimiser, schedule, loss) but the
# specialist settings, which are this study's own.
RECIPES = dict(generalist='mnist5k_teacher', specialist='mnist5k_teacher',
               distill='mnist5k_distill', distill_generalist='mnist5k_distill',
               student='mnist5k_student')
SPECIALIST_LEARNING_RATE = 0.02


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'generalist'
  c.root = 'workdirs/specialists_mnist5k'
  c.specialist.num_groups = 3
  c.specialist.cluster_temperature = 20.0
  c.specialist.top_n = 2
  c.specialist_epochs = 15.0
  config_lib.parse_arg(c, arg)  # Learns the role; parsed again below so
  if c.role not in ROLES:       # that the arg overrides the recipe.
    raise ValueError(f'config.role={c.role!r}; choose one of {ROLES}, e.g. '
                     '--config=configs/specialists_mnist5k.py:role=student.')
  recipe = config_lib.load_config(RECIPES[c.role])
  for key in config_lib.default_config():
    if key != 'specialist':
      c[key] = recipe[key]
  if c.role == 'specialist':  # Fine-tunes the generalist: the study's own.
    c.learning_rate = SPECIALIST_LEARNING_RATE
    c.num_epochs = c.specialist_epochs
  config_lib.parse_arg(c, arg)
  return apply_role(c)


def apply_role(c):
  """Sets the groups file, warm start and teachers of `c.role` (`c.root`)."""
  generalist_dir = f'{c.root}/generalist'
  generalist = config_lib.load_config(RECIPES['generalist']).model
  if c.specialist.groups is None and not c.specialist.groups_file:
    c.specialist.groups_file = f'{c.root}/groups.json'
  if c.role == 'specialist':
    if c.specialist.index < 0:
      raise ValueError('role=specialist needs config.specialist.index >= 0, '
                       'e.g. :role=specialist,specialist.index=0.')
    c.init_from = generalist_dir
  elif c.specialist.index >= 0:
    raise ValueError(f'config.specialist.index={c.specialist.index} is for '
                     f'role=specialist, not role={c.role}.')
  if c.role == 'distill':
    c.distill.teacher_source = 'specialists'
    c.teachers = [config_lib.teacher_config(generalist, generalist_dir)] + [
        config_lib.teacher_config(generalist, f'{c.root}/specialist_{k}')
        for k in range(c.specialist.num_groups)]
  elif c.role == 'distill_generalist':
    c.teachers = [config_lib.teacher_config(generalist, generalist_dir)]
  return c
