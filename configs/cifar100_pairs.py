r"""CIFAR-100: the 13 teacher -> student pairs of the CRD benchmark, with KD.

Tian, Krishnan & Isola (2020), "Contrastive Representation Distillation",
Tables 1 (same architecture family) and 2 (across families), trained with
RepDistiller's recipe: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05
(0.01 when the trained model is MobileNetV2 or a ShuffleNet) decayed x0.1 at
epochs 150, 180 and 210, weight decay 5e-4, random crop + flip; KD as their
`--distill kd -r 0.1 -a 0.9`: T = 4, weight 0.9 on the soft term and 0.1 on
cross-entropy. `pair=<teacher>_<student>` picks the pair (default
resnet32x4_resnet8x4), `role` what to train. For a GPU/TPU with TFDS
cifar100:

  python -m kd_jax.main \
      --config=configs/cifar100_pairs.py:pair=vgg13_mobilenetv2,role=teacher \
      --workdir=workdirs/cifar100_vgg13
  python -m kd_jax.main \
      --config=configs/cifar100_pairs.py:pair=vgg13_mobilenetv2,role=student \
      --workdir=workdirs/cifar100_mobilenetv2
  python -m kd_jax.main \
      --config=configs/cifar100_pairs.py:pair=vgg13_mobilenetv2,role=distill,teacher_workdir=workdirs/cifar100_vgg13 \
      --workdir=workdirs/cifar100_vgg13_mobilenetv2_kd

teacher_workdir defaults to workdirs/cifar100_<teacher>. Top-1 (%) the paper
reports for teacher / student trained alone / student with KD:

  pair (teacher_student)        teacher  student  KD
  wrn_40_2_wrn_16_2              75.61    73.26   74.92
  wrn_40_2_wrn_40_1              75.61    71.98   73.54
  resnet56_resnet20              72.34    69.06   70.66
  resnet110_resnet20             74.31    69.06   70.67
  resnet110_resnet32             74.31    71.14   73.08
  resnet32x4_resnet8x4           79.42    72.50   73.33
  vgg13_vgg8                     74.64    70.36   72.98
  vgg13_mobilenetv2              74.64    64.60   67.37
  resnet50_cifar_mobilenetv2     79.34    64.60   67.35
  resnet50_cifar_vgg8            79.34    70.36   73.81
  resnet32x4_shufflenetv1        79.42    70.50   74.07
  resnet32x4_shufflenetv2        79.42    71.82   74.45
  wrn_40_2_shufflenetv1          75.61    70.50   74.83

None of these was run here: this project's machine has no CIFAR-100 and no
accelerator for 240 epochs. `runlocal` swaps each model for a small stand-in
of its family (see `RUNLOCAL_MODELS`) so that the smoke run compiles in
seconds.
"""

import dataclasses

from kd_jax import config_lib


@dataclasses.dataclass(frozen=True)
class Pair:
  teacher: str
  student: str
  teacher_top1: float
  student_top1: float
  kd_top1: float


PAIRS = {f'{p.teacher}_{p.student}': p for p in (
    Pair('wrn_40_2', 'wrn_16_2', 75.61, 73.26, 74.92),
    Pair('wrn_40_2', 'wrn_40_1', 75.61, 71.98, 73.54),
    Pair('resnet56', 'resnet20', 72.34, 69.06, 70.66),
    Pair('resnet110', 'resnet20', 74.31, 69.06, 70.67),
    Pair('resnet110', 'resnet32', 74.31, 71.14, 73.08),
    Pair('resnet32x4', 'resnet8x4', 79.42, 72.50, 73.33),
    Pair('vgg13', 'vgg8', 74.64, 70.36, 72.98),
    Pair('vgg13', 'mobilenetv2', 74.64, 64.60, 67.37),
    Pair('resnet50_cifar', 'mobilenetv2', 79.34, 64.60, 67.35),
    Pair('resnet50_cifar', 'vgg8', 79.34, 70.36, 73.81),
    Pair('resnet32x4', 'shufflenetv1', 79.42, 70.50, 74.07),
    Pair('resnet32x4', 'shufflenetv2', 79.42, 71.82, 74.45),
    Pair('wrn_40_2', 'shufflenetv1', 75.61, 70.50, 74.83),
)}

# RepDistiller trains these at lr 0.01 instead of 0.05.
LOW_LR_MODELS = ('mobilenetv2', 'shufflenetv1', 'shufflenetv2')

# runlocal's stand-ins: the smallest model of each family.
RUNLOCAL_MODELS = {
    'resnet20': 'resnet8', 'resnet32': 'resnet8', 'resnet56': 'resnet8',
    'resnet110': 'resnet8', 'resnet8x4': 'resnet8', 'resnet32x4': 'resnet8',
    'resnet50_cifar': 'resnet8', 'wrn_16_2': 'wrn_16_1',
    'wrn_40_1': 'wrn_16_1', 'wrn_40_2': 'wrn_16_1', 'vgg13': 'vgg8',
    'vgg8': 'vgg8',
}
RUNLOCAL_KWARGS = {
    'mobilenetv2': dict(group_sizes=(1,) * 7),
    'shufflenetv1': dict(stage_sizes=(1, 1, 1)),
    'shufflenetv2': dict(stage_sizes=(1, 1, 1)),
}


def model_spec(name: str, runlocal: bool):
  """The model spec of `name`, or of its small stand-in for runlocal."""
  if not runlocal:
    return config_lib.model_config(name)
  return config_lib.model_config(RUNLOCAL_MODELS.get(name, name),
                                 **RUNLOCAL_KWARGS.get(name, {}))


def get_config(arg=None):
  c = config_lib.default_config()
  c.pair = 'resnet32x4_resnet8x4'
  c.role = 'distill'
  c.teacher_workdir = ''         # '' -> workdirs/cifar100_<teacher>.
  c.runlocal_models = False
  config_lib.cifar100_recipe(c, learning_rate=0.0)  # 0 -> the model's rate.
  c.distill.temperature = 4.0
  c.distill.alpha = 0.9
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  if c.pair not in PAIRS:
    raise ValueError(f'config.pair={c.pair!r} is not a CRD benchmark pair; '
                     f'choose one of {sorted(PAIRS)} (e.g. '
                     '--config=configs/cifar100_pairs.py:pair=vgg13_vgg8).')
  pair = PAIRS[c.pair]
  trained = pair.teacher if c.role == 'teacher' else pair.student
  if not c.learning_rate:
    c.learning_rate = 0.01 if trained in LOW_LR_MODELS else 0.05
  if not c.teacher_workdir:
    c.teacher_workdir = f'workdirs/cifar100_{pair.teacher}'
  return config_lib.apply_role(c, model_spec(pair.teacher, c.runlocal_models),
                               model_spec(pair.student, c.runlocal_models))


def _runlocal(c):
  config_lib.shrink_for_runlocal(c)
  c.runlocal_models = True
