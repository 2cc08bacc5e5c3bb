r"""The mnist5k 2x800 student distilled from an ensemble of 2x1200 teachers.

Three teachers that differ only by seed (configs/mnist5k_teacher.py's recipe),
then the student:

  for k in 0 1 2; do
    python -m kd_jax.main --config=configs/mnist5k_ensemble.py:role=teacher,seed=$k \
        --workdir=workdirs/mnist5k_ensemble/teacher$k
  done
  python -m kd_jax.main --config=configs/mnist5k_ensemble.py:role=distill \
      --workdir=workdirs/mnist5k_ensemble/student

`root` holds `teacher0 .. teacher{num_teachers-1}`; the distill role
stacks them into one pytree and runs them with one vmapped forward pass.
`distill.ensemble_method` combines them: `mean_probs` (arithmetic mean of
probabilities), `mean_log_probs` (renormalised geometric mean) or
`sum_losses` (the weighted sum of one soft loss per teacher);
`teacher_weights='2+1+1'` weights them (default: uniform), e.g.

  python -m kd_jax.main \
      --config=configs/mnist5k_ensemble.py:role=distill,distill.ensemble_method=mean_log_probs,teacher_weights=2+1+1 \
      --workdir=workdirs/mnist5k_ensemble/student_geo

summary.json reports, per eval split, `accuracy` (the student),
`teacher_accuracy` (the combined ensemble) and `teacher{k}_accuracy` (each
teacher; `summary['teachers']` maps the names to their workdirs and weights).

The ensemble exports to a logits cache like a single teacher (not with
sum_losses, which needs each teacher's logits in the step), and
configs/mnist5k_distill_cached.py trains from it:

  python -m kd_jax.export_logits --config=configs/mnist5k_ensemble.py:role=distill \
      --out=workdirs/mnist5k_ensemble/logits
  python -m kd_jax.main \
      --config=configs/mnist5k_distill_cached.py:cache_dir=workdirs/mnist5k_ensemble/logits \
      --workdir=workdirs/mnist5k_ensemble/student_cached

`role=student` trains the same student without a teacher. With three
teachers of the validated recipe (seeds 0-2; test accuracy 0.974 / 0.973 /
0.973) their mean_probs ensemble reaches 0.976, the student 0.958 (0.960
from the ensemble's cache; the same student alone 0.941); one seed each, see
experiments/offline_kd/README.md.
"""

from kd_jax import config_lib

TEACHER_MODEL = config_lib.model_config('mlp', hidden=(1200, 1200),
                                        dropout=0.5, input_dropout=0.2)
STUDENT_MODEL = config_lib.model_config('mlp', hidden=(800, 800), dropout=0.0)


def teacher_workdirs(config) -> list[str]:
  return [f'{config.root}/teacher{k}'
          for k in range(config.num_teachers)]


def get_config(arg=None):
  c = config_lib.default_config()
  c.dataset = 'mnist5k'
  c.train_split = 'train[:3600]'
  c.eval_splits = ('train[3600:]', 'test')  # validation, test.
  c.batch_size = 128
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.schedule = 'cosine'
  c.num_epochs = 60
  c.checkpoint_every_steps = 500
  c.distill.temperature = 20.0
  c.distill.alpha = 0.9
  c.distill.soft = 'kl'
  c.distill.ensemble_method = 'mean_probs'
  c.role = 'distill'
  c.root = 'workdirs/mnist5k_ensemble'
  c.num_teachers = 3
  c.teacher_weights = ''         # '2+1+1'; empty: uniform.
  c.teacher_model = TEACHER_MODEL
  c.student_model = STUDENT_MODEL
  config_lib.parse_arg(c, arg)  # Learns the role; parsed again below so
  if c.role not in config_lib.ROLES:  # that the arg overrides role defaults.
    raise ValueError(f'config.role={c.role!r}; choose one of '
                     f'{config_lib.ROLES}.')
  if c.role == 'teacher':  # As configs/mnist5k_teacher.py, with this seed.
    c.model = c.teacher_model
    c.augment = 'mnist_jitter'
    c.learning_rate = 0.02
    c.max_norm = 3.5
    c.num_epochs = 150
  else:  # As configs/mnist5k_student.py / mnist5k_distill.py.
    c.model = c.student_model
    c.augment = 'none'
    c.learning_rate = 0.03
  config_lib.parse_arg(c, arg)
  if c.role != 'distill':
    c.distill.teacher_source = 'none'
    c.distill.alpha = 0.0
    return c

  weights = [float(w) for w in str(c.teacher_weights).split('+') if w]
  if weights and len(weights) != c.num_teachers:
    raise ValueError(
        f'config.teacher_weights={c.teacher_weights!r} gives {len(weights)} '
        f'weights for num_teachers={c.num_teachers}; give one per teacher, '
        f"e.g. teacher_weights={'+'.join(['1'] * c.num_teachers)}.")
  weights = weights or [1.0] * c.num_teachers
  c.distill.teacher_source = 'ensemble'
  c.teachers = [config_lib.teacher_config(c.teacher_model, workdir, weight)
                for workdir, weight in zip(teacher_workdirs(c), weights)]
  return c
