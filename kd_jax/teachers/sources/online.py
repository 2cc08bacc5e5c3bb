"""One frozen teacher restored from a finished run (`config.teachers[0]`),
run inside the student's step; it gives its named features too (feature
terms), and its variables may be split over devices."""

from kd_jax.teachers import online
from kd_jax.teachers import sources


def load(config, info, dtype, mesh=None):
  return online.load_online(
      config.teachers, info.num_classes, info.image_shape, dtype=dtype,
      mesh=mesh if config.distill.shard_teacher else None,
      normalization=online.stream_normalization(info))


SOURCE = sources.register(sources.TeacherSource(
    name='online', load=load, origins=sources.workdir_origins,
    computes_features=True, shardable=True, sees_images=True,
    changed='retrained'))
