"""No teacher: a supervised run (a teacher, a student from scratch)."""

from kd_jax.teachers import sources

SOURCE = sources.register(sources.TeacherSource(name='none', load=None))
