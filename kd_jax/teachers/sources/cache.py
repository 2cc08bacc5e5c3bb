"""A logits cache written by `kd_jax.export_logits` (or imported from a
black-box teacher): the logits enter each batch on the host, by example id."""

from kd_jax.teachers import cache
from kd_jax.teachers import sources


def load(config, info, dtype=None, mesh=None):
  del dtype, mesh  # Cached logits are stored values, not computed in the run.
  return cache.load_cache(config, info)


def origins(config):
  return [dict(cache_dir=config.distill.cache_dir)]


SOURCE = sources.register(sources.TeacherSource(
    name='cache', load=load, origins=origins, changed='re-exported',
    pipeline_config=cache.pipeline_config))
