"""A generalist and its specialists (Hinton et al. 2015, sec. 5), combined
inside the step as one teacher (`kd_jax.specialists.teacher`):
`config.teachers` holds the generalist, then the specialists in group
order."""

from kd_jax.specialists import teacher
from kd_jax.teachers import sources


def check(config):
  if config.specialist.index >= 0:
    raise ValueError(
        f'config.specialist.index={config.specialist.index} trains one '
        'specialist, but config.distill.teacher_source="specialists" distils '
        'the whole ensemble into a student on all classes: set '
        'config.specialist.index=-1.')


SOURCE = sources.register(sources.TeacherSource(
    name='specialists', load=teacher.load_specialists,
    changed='retrained', check=check))
