"""Several frozen teachers (`config.teachers`), combined by
`config.distill.ensemble_method` with their weights; teachers of one
architecture are one stacked pytree run with `jax.vmap`."""

from kd_jax.teachers import sources
from kd_jax.teachers.sources import online

SOURCE = sources.register(sources.TeacherSource(
    name='ensemble', load=online.load, origins=sources.workdir_origins,
    shardable=True, sees_images=True, changed='retrained'))
