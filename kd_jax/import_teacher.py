r"""Imports a torchvision, timm or big_vision checkpoint as a finished run.

  pip install -e '.[import]'
  python -m kd_jax.import_teacher --format=torchvision --model=resnet18 \
      --weights=resnet18.safetensors --workdir=workdirs/resnet18_imagenet \
      [--num_classes=2] [--class_names=classes.txt] [--image_size=224]
  python -m kd_jax.import_teacher --format=big_vision --model=vit-S/16 \
      --weights=vit_s16_i1k_300ep.npz --workdir=workdirs/vit_s16_bv

reads a state dict that the user already has (nothing downloads) and
writes a run directory like a finished training run's: the checkpoint
(`kd_jax.checkpointing`, step 0), config.json, run_info.json and
summary.json (`kd_jax.rundir`), plus imported.json, this module's record
of where the weights came from and the input normalisation they expect.
Distill configs take it as `teacher_workdir` (with the teacher's model spec
from its run_info, `teacher_config(None, workdir)`, or one equal to it),
`config.init_from` warm-starts from it, and `kd_jax.export_model` and
`kd_jax.export_logits` read it like a trained run.

Files: `.safetensors` (read with the `safetensors` package and NumPy; no
PyTorch needed), `.pth` / `.pt` / `.bin` (only where PyTorch is installed:
`torch.load(..., weights_only=True)`; a checkpoint dict's 'state_dict' or
'model' entry, DataParallel's 'module.' prefixes dropped), `.npz` (a
big_vision checkpoint: params named by their tree paths joined by '/', at
the top or under 'params/'; `kd_jax.interop.layouts.big_vision_state`).

Models (`kd_jax.interop.layouts`): torchvision `resnet18`, `resnet34`,
`resnet50`, `mobilenet_v2`; timm `vit_{tiny,small}_patch16_224`,
`deit_{tiny,small}_patch16_224`, `deit_{tiny,small}_distilled_patch16_224`;
big_vision `vit-{Ti,S,M,B,L,H}/{8,14,16,32}` (models/vit.py: pool_type
'tok' or 'gap', posemb 'learn' or 'sincos2d', with or without rep_size's
pre-logits, all read from the file; the tanh GELU) and
`bit-R{26,50,101,152}x{1,2,3,4}` (models/bit.py). What big_vision models
stay refused, and why: `layouts.BIG_VISION_REFUSED`.

Every tensor the architecture needs that the file lacks, every tensor of the
file that it does not use, and every tensor of another shape is refused,
all of them by name with both shapes. `--num_classes` (or the number of
--class_names) other than the checkpoint's replaces the classifier head by
a freshly initialised one, as fine-tuning expects, and says so.

The run records the normalisation the weights expect, of pixel / 255:
ImageNet mean and std for torchvision and DeiT, 0.5 and 0.5 for timm's
AugReg ViTs and for big_vision's models (its `value_range(-1, 1)`; override
with --mean / --std). kd_jax's input pipeline
normalises with the dataset's constants (`kd_jax.data.preprocess`), so a
run that distils from the imported teacher feeds it the dataset's
normalisation; `export_model` builds the teacher's own into its file.
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import json
import os
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import models
from kd_jax import progress
from kd_jax import rundir
from kd_jax.data import preprocess
from kd_jax.interop import layouts

FORMATS = ('torchvision', 'timm', 'big_vision')
RECORD = 'imported.json'
# Shown at most this many mismatched tensors per kind.
_SHOWN = 20


class WeightsMismatch(ValueError):
  """The file's tensors are not the architecture's."""


class MissingReader(ImportError):
  """The package that reads the weights file is not installed."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors, .pth / .pt / .bin or .npz file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--weights={path!r} is not a file.')
  if path.endswith('.safetensors'):
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise MissingReader('reading .safetensors needs the safetensors '
                          "package: pip install -e '.[import]'") from None
    state = safetensors_numpy.load_file(path)
  elif path.endswith(('.pth', '.pt', '.bin')):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise MissingReader(
          f'--weights={path!r} is a PyTorch pickle, which only PyTorch '
          'reads, and PyTorch is not installed. Install it (pip install '
          'torch), or convert the file to .safetensors where PyTorch is: '
          'python -c "import torch, safetensors.torch as s; '
          f's.save_file(torch.load({path!r}, weights_only=True), '
          '\'weights.safetensors\')"') from None
    state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
      if isinstance(state.get(key), dict):
        state = state[key]
    state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in state.items()}
  elif path.endswith('.npz'):
    with np.load(path) as f:
      state = dict(f)
  else:
    raise ValueError(f'--weights={path!r}: give a .safetensors, .pth, .pt, '
                     '.bin or .npz file.')
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state


def _listed(items: Sequence[str]) -> str:
  more = len(items) - _SHOWN
  return '; '.join(items[:_SHOWN]) + (f'; and {more} more' if more > 0 else '')


def check_tensors(tensors: Sequence[layouts.Tensor],
                  state: dict[str, np.ndarray], where: str) -> None:
  """Raises WeightsMismatch naming every missing, unexpected and mis-shaped
  tensor of `state` (both shapes) against `tensors`."""
  expected = {t.name: t for t in tensors}
  missing = [f'{n} {list(t.shape)}' for n, t in expected.items()
             if n not in state]
  unexpected = [f'{k} {list(v.shape)}' for k, v in state.items()
                if k not in expected and not k.endswith(
                    layouts.IGNORED_SUFFIXES)]
  misshaped = [f'{n}: file {list(state[n].shape)}, expected {list(t.shape)}'
               for n, t in expected.items()
               if n in state and tuple(state[n].shape) != t.shape]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing (name [expected shape]): '
                    f'{_listed(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected (name [file shape]): '
                    f'{_listed(unexpected)}')
  if misshaped:
    problems.append(f'{len(misshaped)} of another shape: '
                    f'{_listed(misshaped)}')
  if problems:
    raise WeightsMismatch(
        f'{where} is not that architecture\'s state dict: '
        + '. '.join(problems) + '. Check --format and --model (and '
        '--image_size for a ViT, whose position embeddings hold one per '
        'patch, plus its tokens\' in timm\'s layout).')


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def convert(architecture: layouts.Architecture, state: dict[str, np.ndarray],
            num_classes: int | None, image_shape: Sequence[int],
            where: str = 'the file', seed: int = 0
            ) -> tuple[dict[str, Any], int]:
  """The zoo variables {'params', 'batch_stats'} holding `state`'s weights.

  Args:
    architecture: the registered layout.
    state: the file's tensors.
    num_classes: the run's classes; None: the checkpoint's. Another number
      than the checkpoint's replaces the head by the zoo's initialisation
      (drawn from `seed`).
    image_shape: (H, W, C) the model will take.
    where: names the file in errors.
    seed: the key of that initialisation.

  Returns:
    (variables as numpy arrays, the checkpoint's number of classes).

  Raises:
    WeightsMismatch: naming every missing, unexpected or mis-shaped tensor.
  """
  head = state.get(architecture.head[0])
  file_classes = (int(head.shape[0]) if head is not None and head.ndim
                  else num_classes or 1000)
  num_classes = num_classes or file_classes
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  file_model = models.get_model(architecture.spec, file_classes)
  abstract = jax.eval_shape(file_model.init, jax.random.key(seed), images)
  tensors = architecture.tensors(abstract)
  check_tensors(tensors, state, where)
  replace_head = num_classes != file_classes
  filled, head_paths = {}, set()
  for t in tensors:
    values = t.fill(np.asarray(state[t.name], np.float32))
    if replace_head and t.name in architecture.head:
      head_paths.update(values)
    else:
      filled.update(values)
  target, fresh = abstract, {}
  if replace_head:
    model = models.get_model(architecture.spec, num_classes)
    target = jax.eval_shape(model.init, jax.random.key(seed), images)

    def init_head(key):  # Compiled alone, the rest of init is dead code.
      variables = model.init(key, jnp.zeros(images.shape, jnp.float32))
      return {path: _leaf(variables, path) for path in head_paths}
    fresh = jax.device_get(jax.jit(init_head)(jax.random.key(seed)))

  def pick(path, leaf):
    del leaf
    key = tuple(p.key for p in path)
    if key in filled:
      return filled[key]
    if key in fresh:  # The new head, initialised.
      return np.asarray(fresh[key])
    # Every leaf has a tensor in the layout: a leaf without is a layout bug.
    raise RuntimeError(f'{jax.tree_util.keystr(path)} of {architecture.spec} '
                       'has no tensor in its layout (kd_jax.interop.layouts).')
  variables = jax.tree_util.tree_map_with_path(pick, dict(target))
  return ({'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {})}, file_classes)


# ---------------------------------------------------------------------------
# imported.json
# ---------------------------------------------------------------------------


def read_record(workdir: str) -> dict[str, Any] | None:
  """The import record of an imported run; None for a trained one."""
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_record(workdir: str, record: dict[str, Any]) -> None:
  path = os.path.join(workdir, RECORD)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def input_normalization(workdir: str, run_info: dict[str, Any]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) [C] of pixel / 255 that the run's model expects: those the
  imported weights expect, or those of the dataset the run trained on (its
  input pipeline's)."""
  record = read_record(workdir)
  if record is not None:
    norm = record['input_normalization']
    return (np.asarray(norm['mean'], np.float32),
            np.asarray(norm['std'], np.float32))
  return preprocess.normalization(run_info['dataset'],
                                      int(run_info['image_shape'][2]))


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def read_class_names(path: str) -> list[str]:
  """One class name a line (blank lines skipped)."""
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  if len(set(names)) != len(names):
    raise ValueError(f'--class_names={path!r} repeats a name; class names '
                     'must be unique.')
  return names


def import_weights(fmt: str, model: str, weights: str, workdir: str, *,
                   num_classes: int | None = None,
                   class_names: Sequence[str] | None = None,
                   image_size: int = 224,
                   mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   dataset: str = 'imagenet2012') -> dict[str, Any]:
  """Writes the weights in `weights` as a finished run in `workdir`.

  Args:
    fmt: 'torchvision', 'timm' or 'big_vision'.
    model: the library's model name, e.g. 'resnet18', 'deit_tiny_patch16_224',
      'vit-S/16' (big_vision's `vit` of that variant), 'bit-R50x1'.
    weights: the state dict file.
    workdir: a fresh run directory.
    num_classes: the run's classes; default len(class_names), else the
      checkpoint's. Another number replaces the head (initialised).
    class_names: the run's class names; default '0', '1', ...
    image_size: side of the square RGB images the model takes.
    mean, std: normalisation of pixel / 255 the weights expect; default the
      library's for that model.
    dataset: the dataset the weights were trained on, as the run records it.

  Returns:
    The import record (also written to imported.json), with 'num_params'.

  Raises:
    WeightsMismatch: the file is not that architecture's state dict.
    ValueError, FileExistsError: a bad flag, or a workdir holding a run.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; choose one of {FORMATS}.')
  architecture = layouts.architecture(fmt, model)
  if class_names is not None:
    class_names = list(class_names)
    if num_classes is not None and num_classes != len(class_names):
      raise ValueError(f'--num_classes={num_classes} but --class_names has '
                       f'{len(class_names)} names: give one name per class.')
    num_classes = len(class_names)
  if num_classes is not None and num_classes < 1:
    raise ValueError(f'--num_classes={num_classes}; use 1 or more.')
  if image_size < 1:
    raise ValueError(f'--image_size={image_size}; use a positive side.')
  mean = tuple(float(m) for m in (mean or architecture.mean))
  std = tuple(float(s) for s in (std or architecture.std))
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f'--mean={list(mean)}, --std={list(std)}: give 3 '
                     'values each (RGB), std > 0.')
  if (rundir.is_finished(workdir)
      or checkpointing.latest_step(workdir) is not None):
    raise FileExistsError(f'--workdir={workdir!r} already holds a run: '
                          'import into a fresh workdir.')
  image_shape = (image_size, image_size, 3)
  architecture, state = architecture.for_file(read_state_dict(weights))
  variables, file_classes = convert(architecture, state, num_classes,
                                    image_shape, where=weights)
  num_classes = num_classes or file_classes
  class_names = class_names or [str(i) for i in range(num_classes)]
  spec = dict(architecture.spec)
  head = ('kept' if num_classes == file_classes else
          f'replaced: the checkpoint\'s {file_classes} classes -> '
          f'{num_classes}, initialised as kd_jax.models initialises it '
          f'({", ".join(architecture.head)} not used)')
  record = dict(format=fmt, model=model, weights=os.path.abspath(weights),
                sha256=_sha256(weights), spec=spec,
                input_normalization=dict(of='pixel / 255', mean=list(mean),
                                         std=list(std)),
                checkpoint_num_classes=file_classes, head=head)

  os.makedirs(workdir, exist_ok=True)
  with rundir.lock(workdir):
    mngr = checkpointing.manager(workdir, keep=1)
    checkpointing.save(mngr, dict(variables, step=np.int32(0)),
                       dict(imported=record))
    mngr.wait_until_finished()
    mngr.close()
    config = config_lib.default_config()
    config.model = config_lib.model_config(**spec)
    config.dataset = dataset
    config.image_size = image_shape[:2]
    config.channels = 3
    config.num_train_steps = 0
    rundir.write_config(workdir, rundir.config_json(config))
    rundir.write_run_info(workdir, model_spec=spec, num_classes=num_classes,
                          class_names=class_names, image_shape=image_shape,
                          dataset=dataset, final_step=0)
    _write_record(workdir, record)
    params = variables['params']
    rundir.write_summary(workdir, dict(
        step=0, model=spec['name'], teacher_source='none', teachers=[],
        num_params=models.param_count(params),
        param_bytes=models.param_bytes(params), train_seconds=0.0, eval={},
        collapse_warnings=[], imported=record))
  return dict(record, num_params=models.param_count(params))


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program."""
  flags.DEFINE_enum('format', None, FORMATS, 'The library the weights are '
                    'laid out for.')
  flags.DEFINE_string('model', None, "The library's model name, e.g. "
                      'resnet18, mobilenet_v2, deit_tiny_patch16_224, '
                      'vit-S/16 (big_vision), bit-R50x1.')
  flags.DEFINE_string('weights', None, 'The state dict (.safetensors, .pth, '
                      '.pt, .bin, .npz).')
  flags.DEFINE_string('workdir', None, 'The run directory to write (fresh).')
  flags.DEFINE_integer('num_classes', None, "The run's classes; another "
                       "number than the checkpoint's replaces the head.")
  flags.DEFINE_string('class_names', None, 'A text file of class names, one '
                      'a line.')
  flags.DEFINE_integer('image_size', 224, 'Side of the square RGB images.')
  flags.DEFINE_list('mean', None, 'Per-channel mean of pixel / 255 the '
                    "weights expect (default: the library's).")
  flags.DEFINE_list('std', None, 'Per-channel std, likewise.')
  flags.DEFINE_string('dataset', 'imagenet2012', 'The dataset the weights '
                      'were trained on, as the run records it.')
  flags.mark_flags_as_required(['format', 'model', 'weights', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  names = read_class_names(f.class_names) if f.class_names else None
  r = import_weights(
      f.format, f.model, f.weights, f.workdir, num_classes=f.num_classes,
      class_names=names, image_size=f.image_size,
      mean=f.mean and [float(m) for m in f.mean],
      std=f.std and [float(s) for s in f.std], dataset=f.dataset)
  print(f'{f.workdir}: {f.format} {f.model} as {r["spec"]}, '
        f'{r["num_params"]:,} params, images {f.image_size}x{f.image_size}x3 '
        f'normalised with mean {r["input_normalization"]["mean"]}, std '
        f'{r["input_normalization"]["std"]}')
  print(f'head: {r["head"]}')


if __name__ == '__main__':
  progress.run_quiet_cli(main, define_flags)
