"""Online teachers: frozen supervised runs restored from their checkpoints.

An ensemble of teachers with the same architecture is one stacked pytree run
with `jax.vmap`; teachers of different architectures run one after another.

Each teacher sees the pixels normalised as its weights expect: an imported
run's recorded input normalisation (torchvision's ImageNet mean and std), or
that of the dataset its run trained on. Where that differs from the
student's stream, the batch is renormalised per channel for that teacher
inside the step (`image * std_s / std_t + (mean_s - mean_t) / std_t`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpointing
from kd_jax import import_teacher
from kd_jax import models
from kd_jax import rundir
from kd_jax.data import preprocess
from kd_jax.models import features as model_features
from kd_jax.teachers.base import Teacher


def teacher_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes a sharded teacher is split over: 'model' where the mesh
  has a 'model' axis of more than one device (each layer's gather then stays
  within a group of that many devices), else every axis (all devices)."""
  if mesh.shape.get('model', 1) > 1:
    return ('model',)
  return tuple(mesh.axis_names)


def teacher_shardings(variables: Any, mesh: jax.sharding.Mesh) -> Any:
  """FSDP-style layout of frozen teacher variables on `mesh`: each array
  split over `teacher_axes(mesh)` along its largest axis that their device
  count divides (replicated if none does), so each device holds about 1/n
  of the teacher; XLA gathers each layer's weights where the forward pass
  needs them. The teacher's outputs are those of the replicated teacher.
  `variables` may hold arrays or `jax.ShapeDtypeStruct`s."""
  axes = teacher_axes(mesh)
  num_shards = int(np.prod([mesh.shape[a] for a in axes]))
  name = axes[0] if len(axes) == 1 else axes

  def layout(leaf):
    dims = [a for a in range(leaf.ndim) if leaf.shape[a] % num_shards == 0
            and leaf.shape[a] >= num_shards]
    if num_shards == 1 or not dims:
      return NamedSharding(mesh, P())
    dim = max(dims, key=lambda a: (leaf.shape[a], -a))
    spec = [None] * leaf.ndim
    spec[dim] = name
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(layout, variables)


def check_compatible(index: int, teacher_cfg, run_info: dict[str, Any],
                     num_classes: int, image_shape: tuple[int, ...]) -> None:
  """Refuses config.teachers[index] if its run cannot teach this student.

  Its `run_info` must record the student's classes and image shape, and the
  model spec that `teacher_cfg.model` gives.
  """
  where = f'config.teachers[{index}] (workdir {teacher_cfg.workdir!r})'
  if run_info['num_classes'] != num_classes:
    raise ValueError(
        f'{where} was trained with {run_info["num_classes"]} classes but the '
        f'student dataset has {num_classes}: distil between runs on the same '
        f'classes, or set the student dataset to match.')
  if tuple(run_info['image_shape']) != tuple(image_shape):
    raise ValueError(
        f'{where} expects images of shape {tuple(run_info["image_shape"])} '
        f'but the student input pipeline gives {tuple(image_shape)}: set '
        f'config.image_size/config.channels to match the teacher.')
  trained_spec = run_info['model']
  if teacher_cfg.model is None:  # The run's own spec: nothing to compare.
    return
  if rundir.spec_dict(teacher_cfg.model) != trained_spec:
    raise ValueError(
        f'{where}.model is {rundir.spec_dict(teacher_cfg.model)} but that '
        f'workdir trained {trained_spec}: make config.teachers[{index}].model '
        f'match the trained run.')


def stream_normalization(info) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) [C] of pixel / 255 with which the input pipeline of
  `info` (a `DatasetInfo`) normalises its images."""
  return preprocess.normalization(info.name, int(info.image_shape[2]))


def renormalization(teacher_norms, stream_norm) -> tuple[Any, Any] | None:
  """``(scale [K, C], shift [K, C])`` mapping the stream's normalised images
  to each teacher's (``image * scale + shift``); None when every teacher
  expects the stream's own normalisation (the batch goes in unchanged)."""
  if stream_norm is None or all(
      np.array_equal(m, stream_norm[0]) and np.array_equal(s, stream_norm[1])
      for m, s in teacher_norms):
    return None
  mean, std = (np.asarray(v, np.float32) for v in stream_norm)
  scale = np.stack([std / s for _, s in teacher_norms]).astype(np.float32)
  shift = np.stack([(mean - m) / s for m, s in teacher_norms]).astype(
      np.float32)
  return scale, shift


def _expected_normalization(index: int, workdir: str, run_info,
                            channels: int) -> tuple[np.ndarray, np.ndarray]:
  mean, std = import_teacher.input_normalization(workdir, run_info)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(
        f'config.teachers[{index}] (workdir {workdir!r}) expects inputs '
        f'normalised with mean {mean.tolist()} and std {std.tolist()}, not '
        f'{channels} channel(s): give the student images of its channels.')
  return mean, std


def _restore_teacher(i: int, t, num_classes: int, image_shape, dtype, mesh):
  """(model, variables, spec, step, checksum, expected (mean, std)) of
  config.teachers[i], restored, checked and refused by name when unusable."""
  run_info = rundir.read_run_info(t.workdir, f'config.teachers[{i}].workdir')
  check_compatible(i, t, run_info, num_classes, image_shape)
  norm = _expected_normalization(i, t.workdir, run_info, int(image_shape[-1]))
  spec = rundir.teacher_model(t, f'config.teachers[{i}]')
  model = models.get_model(spec, num_classes, dtype=dtype)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, *image_shape), jnp.float32)))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  if mesh is not None:
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, teacher_shardings(abstract, mesh))
  where = f'config.teachers[{i}] (workdir {t.workdir!r})'
  try:
    variables, step, checksum = checkpointing.restore_model_checked(
        t.workdir, abstract)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'config.teachers[{i}]: {e}. Train the teacher first: '
        f'{rundir.teacher_train_command(t.workdir)}') from None
  except checkpointing.CheckpointDamaged as e:
    raise checkpointing.CheckpointDamaged(
        f'{where}: {e}. Restore that checkpoint folder from a copy, or '
        f'train the teacher again: {rundir.teacher_train_command(t.workdir)}'
    ) from None
  if step != run_info.get('final_step', step):
    raise ValueError(
        f'{where} has not finished '
        f'training: latest checkpoint step {step}, final step '
        f'{run_info["final_step"]}. Let it finish, or resume it.')
  checkpointing.refuse_nonfinite(
      variables, where, step, 'teacher',
      'train it again with a lower learning rate.')
  return model, variables, spec, step, checksum, norm


def load_online(teacher_cfgs, num_classes: int, image_shape: tuple[int, ...],
                dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                normalization: tuple[Any, Any] | None = None) -> Teacher:
  """Restores frozen teachers from their runs' latest checkpoints, each
  checked against its checksum (`checkpointing.restore_model_checked`) and
  for NaN or Inf; their fingerprint is a digest of those checksums.

  With `mesh`, each teacher is restored straight into the split layout of
  `teacher_shardings` (not replicated first) and the returned variables are
  laid out so; without, replicated on every device. With `normalization`,
  the (mean, std) of the batches' images (`stream_normalization`), each
  teacher's input is renormalised to what it expects (module docstring);
  without, the batch goes in as it is.
  """
  if not teacher_cfgs:
    raise ValueError(
        'config.distill.teacher_source is online/ensemble but config.teachers '
        'is empty: add teacher_config(model, workdir) entries.')
  loaded, specs, fingerprints, legacy, norms = [], [], [], [], []
  for i, t in enumerate(teacher_cfgs):
    model, variables, spec, step, checksum, norm = _restore_teacher(
        i, t, num_classes, image_shape, dtype, mesh)
    loaded.append((model, variables))
    specs.append(json.dumps(rundir.spec_dict(spec), sort_keys=True))
    fingerprints.append(checksum)
    legacy.append(f'{os.path.abspath(t.workdir)}@{step}')
    norms.append(norm)

  names = tuple(f'teacher{i}' for i in range(len(loaded)))
  weights = tuple(float(t.get('weight', 1.0)) for t in teacher_cfgs)
  # By content: the same teachers wherever they lie, others if retrained.
  fingerprint = hashlib.sha256('|'.join(fingerprints).encode()).hexdigest()[:16]
  legacy_fingerprints = (
      hashlib.sha256('|'.join(legacy).encode()).hexdigest()[:16],)

  def apply(model, variables, images):
    logits = model.apply(variables, images, train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))

  affine = renormalization(norms, normalization)

  def images_of(images, k):
    """The batch as teacher k expects it."""
    if affine is None:
      return images
    scale, shift = (jnp.asarray(a[k], images.dtype) for a in affine)
    return images * scale + shift

  if len(set(specs)) == 1:
    # Same architecture: one stacked pytree, one vmapped forward pass.
    model = loaded[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[v for _, v in loaded])
    if mesh is not None:
      stacked = jax.device_put(stacked, teacher_shardings(stacked, mesh))
    if affine is None:
      def forward(variables, batch):
        return jax.vmap(apply, in_axes=(None, 0, None))(
            model, variables, batch['image'])
    else:
      def forward(variables, batch):
        images = jnp.stack([images_of(batch['image'], k)
                            for k in range(len(loaded))])
        return jax.vmap(apply, in_axes=(None, 0, 0))(model, variables, images)

    def forward_features(variables, batch):
      if affine is None:
        def one(v):
          logits, features = model_features.apply_with_features(
              model, v, batch['image'], train=False)
          return jax.lax.stop_gradient((logits.astype(jnp.float32), features))
        return jax.vmap(one)(variables)

      def renormalized(v, images):
        logits, features = model_features.apply_with_features(
            model, v, images, train=False)
        return jax.lax.stop_gradient((logits.astype(jnp.float32), features))
      images = jnp.stack([images_of(batch['image'], k)
                          for k in range(len(loaded))])
      return jax.vmap(renormalized)(variables, images)
    return Teacher(stacked, forward, names, weights, fingerprint,
                   forward_features=forward_features,
                   legacy_fingerprints=legacy_fingerprints)

  mixed_models = [m for m, _ in loaded]

  def forward_mixed(variables, batch):
    return jnp.stack([apply(m, v, images_of(batch['image'], k))
                      for k, (m, v) in enumerate(zip(mixed_models,
                                                     variables))])
  return Teacher([v for _, v in loaded], forward_mixed, names, weights,
                 fingerprint, legacy_fingerprints=legacy_fingerprints)

