"""The one place where run-config defaults live.

Every file in `configs/` starts from `default_config()`, sets what its run
needs, and ends with `parse_arg(config, arg)`, so that the command-line string
after the colon (`--config=configs/x.py:runlocal,seed=3`) picks variants the
same way for every run.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import warnings
from typing import Any

import ml_collections


def model_config(name: str, **kwargs: Any) -> ml_collections.ConfigDict:
  """A model spec: `name` picks the module in `kd_jax.models`, the rest are its kwargs."""
  return ml_collections.ConfigDict(dict(name=name, **kwargs))


def teacher_config(model: ml_collections.ConfigDict | None, workdir: str,
                   weight: float = 1.0) -> ml_collections.ConfigDict:
  """A frozen teacher: the workdir of the run that trained it, and its model
  spec; with `model=None` the spec is the one that run recorded in its
  run_info.json (`kd_jax.rundir.teacher_model`)."""
  return ml_collections.ConfigDict(dict(model=model, workdir=workdir,
                                        weight=weight))


def distill_defaults() -> ml_collections.ConfigDict:
  """`config.distill`'s fields and defaults: the teachers and the loss."""
  # Distillation. teacher_source: none | online | cache | ensemble |
  # specialists. Neither type-checked nor converted: `soft` and `ctkd` are a
  # method's name or a plain dict of it and its options.
  return ml_collections.ConfigDict(dict(
      teacher_source='none',
      temperature=1.0,
      alpha=0.0,                 # weight of the soft (teacher) term.
      # The soft term (kd_jax.methods.logit): {'method': name, options...},
      # or the name alone; e.g. {'method': 'dkd', 'beta': 8.0,
      # 'warmup_epochs': 20.0}. Methods: kl | soft_ce | logit_mse | dkd |
      # dist | deit_hard.
      soft={'method': 'kl'},
      hard='ce',                 # ce | mse
      label_smoothing=0.0,
      ensemble_method='mean_probs',  # mean_probs | mean_log_probs | sum_losses
      cache_dir='',              # a logits cache written by export_logits.
      allow_augmented_single_view=False,
      # Explicit term weights (kd_jax.objective): loss = soft_weight * soft +
      # hard_weight * hard; both None: alpha and 1 - alpha.
      soft_weight=ml_collections.FieldReference(None, field_type=float),
      hard_weight=ml_collections.FieldReference(None, field_type=float),
      ensemble_temperature='one',  # one | distillation: T the teachers mix at.
      logit_standardization=False,  # z-score logits before the soft loss.
      # CTKD's learned temperature (kd_jax.methods.ctkd): {'mode': none |
      # global | instance, options...}, or the mode alone.
      ctkd={'mode': 'none'},
      # Feature distillation (kd_jax.objective.feature_terms): a tuple of
      # dicts {method, student, teacher, weight, method options}, each naming
      # student and teacher features (kd_jax.models.features), added to the
      # loss. method: fitnet | at | sp | cc | vid | rkd | pkt | crd.
      features=(),
      # Online teachers: their compute dtype ('': config.dtype; the soft
      # term stays float32), and whether their variables are split over
      # devices (FSDP-style, gathered inside the step; over the mesh's
      # 'model' axis when mesh_model > 1, else over all devices) instead of
      # replicated on every device: for teachers too big for one device.
      teacher_dtype='',          # '' | float32 | bfloat16
      shard_teacher=False,
      # A second, strongly augmented view of each train image with its own
      # soft and hard terms (MLKD's strong view; kd_jax.objective.
      # strong_view): {} for none, or {'augment': 'rand_augment',
      # 'num_ops': 2, 'soft': {...}, 'soft_weight': 1.0, 'hard_weight': 0.1}.
      strong_view={},
  ), type_safe=False, convert_dict=False)


def default_config() -> ml_collections.ConfigDict:
  """All fields a run may set, with their defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data (kd_jax.input_pipeline).
  c.dataset = 'mnist5k'          # a TFDS name, or 'image_folder'.
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.image_folder = ''            # root of root/{train,val,test}/<class>/*.png
  c.train_split = 'train'
  c.eval_splits = ('test',)
  c.label_key = 'label'          # e.g. 'coarse_label' for cifar100.
  c.image_size = ml_collections.FieldReference(None, field_type=tuple)
  c.channels = ml_collections.FieldReference(None, field_type=int)  # 1 or 3
  c.augment = 'none'             # none | mnist_jitter | cifar | imagenet
  c.mixup_alpha = 0.0
  c.shuffle_buffer = 10_000
  c.cache = True
  c.transfer = ml_collections.ConfigDict(dict(
      keep_classes=ml_collections.FieldReference(None, field_type=tuple),
      omit_classes=(),
      fraction=1.0,
  ))
  c.batch_size = 128             # global, over all devices and processes.
  c.eval_batch_size = 512

  # Student (the model being trained).
  c.model = model_config('mlp', hidden=(800, 800), dropout=0.0)

  c.distill = distill_defaults()
  c.teachers = []                # list of teacher_config(...)

  # Specialists (Hinton et al. 2015, sec. 5): the groups of confusable
  # classes, the one specialist a run trains, and how a generalist and its
  # specialists combine (teacher_source='specialists': config.teachers holds
  # the generalist, then the specialists in group order).
  c.specialist = ml_collections.ConfigDict(dict(
      groups_file='',            # written by kd_jax.specialists.cluster.
      groups=ml_collections.FieldReference(None, field_type=tuple),  # by hand
      num_groups=0,              # clusters that kd_jax.specialists.cluster forms.
      cluster_temperature=1.0,   # softens the generalist before clustering.
      index=-1,                  # >= 0: train specialist `index` (+ dustbin).
      in_group_fraction=0.5,     # share of its train draws from its group.
      allow_overlap=False,
      require_coverage=True,
      top_n=1,                   # generalist's top classes pick the active.
      num_steps=20,              # SQUAREM steps of specialists.combine.
  ))
  c.init_from = ''               # workdir of a finished run to warm-start from.

  # Optimisation.
  c.optimizer = 'sgd'            # sgd | adam | adamw
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 0.0
  c.schedule = 'cosine'          # constant | cosine | step
  c.warmup_steps = 0
  c.step_boundaries = ()         # fractions of training, for 'step'.
  c.step_decay = 0.1
  c.grad_clip_norm = 0.0
  c.max_norm = 0.0               # > 0: max-norm constraint on each unit's weights.
  c.dtype = 'float32'            # float32 | bfloat16 compute.
  # Devices on the mesh's 'model' axis: the mesh is (devices / mesh_model,
  # mesh_model) over ('data', 'model'); batches are split over both.
  c.mesh_model = 1
  c.num_epochs = 10.0
  c.num_train_steps = -1         # > 0 overrides num_epochs.

  # Loop.
  c.log_every_steps = 50
  c.eval_every_steps = -1        # <= 0: once per epoch.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.allow_config_change = False
  return c


# config.distill's flat fields before the soft term and CTKD took option
# dicts: old field -> (the method that read it, its option now, its default).
# `upgrade` moves them into `soft` / `ctkd`, warning with the new form.
DEPRECATED_DISTILL_FIELDS = {
    'dkd_alpha': ('dkd', 'alpha', 1.0),
    'dkd_beta': ('dkd', 'beta', 8.0),
    'dkd_warmup_epochs': ('dkd', 'warmup_epochs', 0.0),
    'dist_beta': ('dist', 'beta', 1.0),
    'dist_gamma': ('dist', 'gamma', 1.0),
    'ctkd_min_temperature': ('ctkd', 'min_temperature', 1.0),
    'ctkd_temperature_range': ('ctkd', 'temperature_range', 20.0),
    'ctkd_strength_start': ('ctkd', 'strength_start', 0.0),
    'ctkd_strength_end': ('ctkd', 'strength_end', 1.0),
    'ctkd_strength_epochs': ('ctkd', 'strength_epochs', 10.0),
    'ctkd_hidden': ('ctkd', 'hidden', 256),
}
# Dict fields whose keys are a method's options (checked by the method), so
# that `--config=...:distill.soft.beta=4.0` may set one not yet there.
OPTION_DICTS = ('distill.soft', 'distill.ctkd')


def _as_dict(value: Any, key: str) -> dict[str, Any]:
  """A method field as a plain dict: a name alone becomes {key: name}."""
  if isinstance(value, str):
    return {key: value}
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, dict):
    return dict(value)
  return {key: value}


def method_name(value: Any, key: str = 'method') -> Any:
  """The method a `distill.soft` (or, key='mode', `distill.ctkd`) names."""
  return _as_dict(value, key).get(key)


def translate_distill(distill: dict[str, Any], warn: bool = True
                      ) -> dict[str, Any]:
  """`config.distill` as a plain dict, in the current form.

  The flat fields of `DEPRECATED_DISTILL_FIELDS` move into the option dict
  of the method that read them (`soft` or `ctkd`), with a FutureWarning
  naming the new form when `warn`; those of a method the run does not use
  had no effect and are dropped. `soft` and `ctkd` are then written out in
  full, every option's value included, as config.json records them.

  Raises:
    ValueError: an old field and the new option disagree, or `soft` /
      `ctkd` names no method (`kd_jax.methods`).
  """
  from kd_jax.methods import ctkd  # pylint: disable=g-import-not-at-top
  from kd_jax.methods import logit  # pylint: disable=g-import-not-at-top
  d = dict(distill)
  old = {k: d.pop(k) for k in DEPRECATED_DISTILL_FIELDS if k in d}
  specs = dict(soft=_as_dict(d.get('soft', 'kl'), 'method'),
               ctkd=_as_dict(d.get('ctkd', 'none'), 'mode'))
  owners = dict(soft=specs['soft'].get('method'),
                ctkd='ctkd' if specs['ctkd'].get('mode') != 'none' else None)
  moved, dropped = [], []
  for field, value in old.items():
    owner, option, default = DEPRECATED_DISTILL_FIELDS[field]
    target = next((k for k, v in owners.items() if v == owner), None)
    if target is None:
      if value != default:
        dropped.append(f'config.distill.{field}={value!r}')
      continue
    spec = specs[target]
    if option in spec and spec[option] != value:
      raise ValueError(
          f'config.distill.{field}={value!r} (deprecated) and '
          f'config.distill.{target}[{option!r}]={spec[option]!r} disagree: '
          f'delete config.distill.{field}.')
    spec[option] = value
    moved.append((field, target))
  d['soft'] = logit.canonical(specs['soft'])
  d['ctkd'] = ctkd.canonical(specs['ctkd'])
  if warn and moved:
    targets = sorted({t for _, t in moved})
    new_form = '; '.join(f'config.distill.{t} = {d[t]!r}' for t in targets)
    warnings.warn(
        f'config.distill.{", config.distill.".join(f for f, _ in moved)} '
        f'{"is" if len(moved) == 1 else "are"} deprecated: write {new_form}.',
        FutureWarning, stacklevel=3)
  if warn and dropped:
    warnings.warn(
        f'{", ".join(dropped)}: deprecated, and without effect in this run '
        f'(config.distill.soft is {d["soft"]["method"]!r}, config.distill.'
        f'ctkd {d["ctkd"]["mode"]!r}); dropped. Delete '
        f'{"it" if len(dropped) == 1 else "them"}.', FutureWarning,
        stacklevel=3)
  return d


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` in the current form (`translate_distill`): what
  `train.train_and_evaluate` and `load_config` run; a config already in it
  comes back equal. A language-model config (task 'lm', run by
  `kd_jax.lm_train`) comes back as it is."""
  if config.get('task') == 'lm':
    return config
  distill = translate_distill(config.distill.to_dict())
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for key in set(out.distill.keys()) - set(distill):
      del out.distill[key]
    for key in ('soft', 'ctkd'):
      del out.distill[key]
      out.distill[key] = distill[key]
  return out


# DistiLLM's adaptive schedule (kd_jax.on_policy), with its code's defaults:
# probability 0 at first, +0.1 when the validation loss rose by 0.1, a
# buffer of 1,000 generations replayed at a decreasing ratio.
LM_ADAPTIVE_DEFAULTS = dict(initial=0.0, increment=0.1, tolerance=0.1,
                            capacity=1000, replay='decreasing')


def _upgrade_lm_json(config: dict[str, Any]) -> dict[str, Any]:
  """An LM config.json with the fields added since it was written, at the
  values that train as it did."""
  distill = {'teacher_dtype': 'float32', 'shard_teacher': False,
             **config['distill']}
  generation = distill.get('generation')
  if isinstance(generation, dict):
    distill['generation'] = {
        'schedule': 'fixed', 'adaptive': dict(LM_ADAPTIVE_DEFAULTS),
        'cache_dir': '', **generation}
  return {'mesh_model': 1, 'init_from': '', 'aligned_windows': False, **config,
          'distill': distill}


def upgrade_json(config: dict[str, Any]) -> dict[str, Any]:
  """A config.json's contents in the current form, silently: a workdir
  written before a field moved or was added compares equal to the same run
  now."""
  if not isinstance(config.get('distill'), dict):
    return config
  # An LM config.json of kd_jax's first LM version has no 'task' field; its
  # distill block (skew, convention) tells it from an image run's.
  if config.get('task') == 'lm' or {'skew', 'convention'} & set(
      config['distill']):
    return _upgrade_lm_json(config)
  return dict(config, distill=translate_distill(config['distill'],
                                                warn=False))


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _split_top_level(arg: str) -> list[str]:
  """Splits at commas outside brackets: 'a=1,b=(2,3)' -> ['a=1', 'b=(2,3)']."""
  parts, depth, current = [], 0, ''
  for ch in arg:
    depth += ch in '([{'
    depth -= ch in ')]}'
    if ch == ',' and depth == 0:
      parts.append(current)
      current = ''
    else:
      current += ch
  return parts + [current]


def _did_you_mean(node, parents: list[str], name: str) -> str:
  """' (did you mean a.b?)' for the known field nearest to `name`, or ''."""
  if not isinstance(node, ml_collections.ConfigDict):
    return ''
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f' (did you mean {".".join(parents + close)}?)' if close else ''


def parse_arg(config: ml_collections.ConfigDict, arg: str | None,
              runlocal=None) -> ml_collections.ConfigDict:
  """Applies `arg` ('runlocal,seed=3,distill.temperature=4') to `config`.

  `runlocal` (alias `tiny`) calls the given function on the config to shrink
  it to a seconds-long smoke run; `key=value` pairs set dotted fields, with
  values parsed as Python literals.
  """
  for part in filter(None, _split_top_level(arg or '')):
    if part in ('runlocal', 'tiny'):
      (runlocal or shrink_for_runlocal)(config)
      continue
    if '=' not in part:
      raise ValueError(
          f'config arg {part!r} is neither runlocal/tiny nor key=value; '
          f'example: --config=configs/x.py:runlocal,seed=1')
    key, value = part.split('=', 1)
    parent, _, leaf = key.rpartition('.')
    if parent in OPTION_DICTS:
      _set_option(config, parent, leaf, _parse_value(value))
      continue
    node = config
    *parents, leaf = key.split('.')
    for depth, p in enumerate(parents + [leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node and (
          key.replace('distill.', '', 1) not in DEPRECATED_DISTILL_FIELDS):
        raise ValueError(f'config arg sets unknown field {key!r}'
                         f'{_did_you_mean(node, parents[:depth], p)}')
      if depth < len(parents):
        node = node[p]
    node[leaf] = _parse_value(value)
  return config


def _set_option(config: ml_collections.ConfigDict, field: str, option: str,
                value: Any) -> None:
  """Sets one option of a method's dict (`OPTION_DICTS`), as a new dict; a
  method named alone becomes its dict."""
  node, name = config, field.split('.')
  for p in name[:-1]:
    node = node[p]
  key = 'mode' if name[-1] == 'ctkd' else 'method'
  node[name[-1]] = {**_as_dict(node[name[-1]], key), option: value}


def shrink_for_runlocal(config: ml_collections.ConfigDict) -> None:
  """Seconds-long smoke run: few steps, small batches."""
  config.num_train_steps = 6
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.shuffle_buffer = 256


def cifar100_recipe(config: ml_collections.ConfigDict,
                    learning_rate: float = 0.05) -> None:
  """RepDistiller's CIFAR-100 protocol (Tian et al. 2020), which the CRD,
  DKD, DIST and logit-standardization tables share: 240 epochs, batch 64,
  SGD momentum 0.9, `learning_rate` (0.05; 0.01 for MobileNet/ShuffleNet
  students) decayed x0.1 at epochs 150, 180 and 210, weight decay 5e-4,
  random crop + flip."""
  config.dataset = 'cifar100'
  config.augment = 'cifar'
  config.batch_size = 64
  config.eval_batch_size = 1000
  config.optimizer = 'sgd'
  config.learning_rate = learning_rate
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = 'step'
  config.step_boundaries = (150 / 240, 180 / 240, 210 / 240)
  config.num_epochs = 240
  config.checkpoint_every_steps = 2000


def imagenet_recipe(config: ml_collections.ConfigDict, batch_size: int,
                    learning_rate: float) -> None:
  """The ImageNet KD protocol of the CRD/DKD tables (torchvision's ResNet
  recipe): 224x224 crops, 100 epochs, SGD momentum 0.9, the rate decayed
  x0.1 at 30, 60 and 90 epochs, weight decay 1e-4, bfloat16 compute."""
  config.dataset = 'imagenet2012'
  config.eval_splits = ('validation',)
  config.image_size = (224, 224)
  config.channels = 3
  config.augment = 'imagenet'
  config.cache = False
  config.batch_size = batch_size
  config.eval_batch_size = 1000
  config.optimizer = 'sgd'
  config.learning_rate = learning_rate
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = 'step'
  config.step_boundaries = (0.3, 0.6, 0.9)
  config.num_epochs = 100
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 5000


def shrink_imagenet_for_runlocal(config: ml_collections.ConfigDict) -> None:
  """`shrink_for_runlocal` for `imagenet_recipe` configs: 32x32, float32."""
  shrink_for_runlocal(config)
  config.image_size = (32, 32)
  config.dtype = 'float32'


ROLES = ('teacher', 'student', 'distill')


def apply_role(config: ml_collections.ConfigDict, teacher_model,
               student_model) -> ml_collections.ConfigDict:
  """For configs of a teacher/student pair, selected by `config.role`.

  teacher: trains `teacher_model`; student: trains `student_model` from
  scratch; distill: trains `student_model` from the online teacher in
  `config.teacher_workdir`, with the config's distill settings.
  """
  if config.role not in ROLES:
    raise ValueError(f'config.role={config.role!r}; choose one of {ROLES} '
                     f'(e.g. --config=configs/x.py:role=teacher).')
  if config.role == 'teacher':
    config.model = teacher_model
  else:
    config.model = student_model
  if config.role == 'distill':
    config.distill.teacher_source = 'online'
    config.teachers = [teacher_config(teacher_model, config.teacher_workdir)]
  else:
    config.distill.teacher_source = 'none'
    config.distill.alpha = 0.0
  return config


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def load_config(name: str, arg: str = '') -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s `get_config(arg)`, as `--config=configs/<name>.py:arg` gives it."""
  path = os.path.join(CONFIG_DIR, f'{name}.py')
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    raise FileNotFoundError(f'No config {path}{hint}; known configs: '
                            f'{known}.')
  spec = importlib.util.spec_from_file_location(f'configs.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return upgrade(module.get_config(arg))
