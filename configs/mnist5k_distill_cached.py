r"""The mnist5k distilled student, with the teacher's logits read from a cache.

  python -m kd_jax.main --config=configs/mnist5k_teacher.py \
      --workdir=workdirs/mnist5k_teacher
  python -m kd_jax.export_logits \
      --config=configs/mnist5k_distill_cached.py:teacher_workdir=workdirs/mnist5k_teacher \
      --out=workdirs/mnist5k_teacher_logits
  python -m kd_jax.main \
      --config=configs/mnist5k_distill_cached.py:cache_dir=workdirs/mnist5k_teacher_logits \
      --workdir=workdirs/mnist5k_distill_cached

Same student, data, steps and loss as configs/mnist5k_distill.py, so the two
runs should agree; the 2x1200 teacher runs once per example at export instead
of once per step. The stream is un-augmented (augment='none'), so one cached
view per example is exactly what the online teacher would say.
"""

from kd_jax import config_lib


def get_config(arg=None):
  # Exactly configs/mnist5k_distill.py's run, with the logits from a cache.
  c = config_lib.load_config('mnist5k_distill')
  c.cache_dir = 'workdirs/mnist5k_teacher_logits'
  config_lib.parse_arg(c, arg)
  c.distill.teacher_source = 'cache'
  c.distill.cache_dir = c.cache_dir
  # export_logits runs these teachers; training reads only the cache.
  c.teachers = [config_lib.teacher_config(c.teacher_model, c.teacher_workdir)]
  return c
