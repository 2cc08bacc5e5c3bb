r"""The mnist5k student (2x800) distilled online from the 2x1200 teacher.

  python -m kd_jax.main --config=configs/mnist5k_teacher.py \
      --workdir=workdirs/mnist5k_teacher
  python -m kd_jax.main \
      --config=configs/mnist5k_distill.py:teacher_workdir=workdirs/mnist5k_teacher \
      --workdir=workdirs/mnist5k_distill

Hinton et al. (2015) used T = 20 for the 2x800 student on MNIST; the teacher's
forward pass runs inside the student's compiled step. Same student, data and
steps as configs/mnist5k_student.py, so the two compare directly.
"""

from kd_jax import config_lib


def get_config(arg=None):
  # configs/mnist5k_student.py's run, plus the teacher and the soft term.
  c = config_lib.load_config('mnist5k_student')
  c.distill.teacher_source = 'online'
  c.distill.temperature = 20.0
  c.distill.alpha = 0.9
  c.distill.soft = 'kl'
  c.teacher_workdir = 'workdirs/mnist5k_teacher'
  c.teacher_model = config_lib.model_config(
      'mlp', hidden=(1200, 1200), dropout=0.5, input_dropout=0.2)
  config_lib.parse_arg(c, arg)
  c.teachers = [config_lib.teacher_config(c.teacher_model, c.teacher_workdir)]
  return c
