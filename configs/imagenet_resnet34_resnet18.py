r"""ImageNet, ResNet-34 -> ResNet-18: T = 1, soft weight 0.5, 100 epochs.

The ImageNet protocol of the CRD benchmark (Tian et al. 2020): SGD momentum
0.9, batch 256, lr 0.1 decayed x0.1 at epochs 30, 60 and 90, weight decay
1e-4, random-resized crop + flip at 224 px, bfloat16 compute. Needs
imagenet2012 prepared in config.data_dir (TFDS manual download):

  python -m kd_jax.main \
      --config=configs/imagenet_resnet34_resnet18.py:role=teacher,data_dir=DIR \
      --workdir=workdirs/imagenet_resnet34
  python -m kd_jax.main \
      --config=configs/imagenet_resnet34_resnet18.py:role=distill,data_dir=DIR,teacher_workdir=workdirs/imagenet_resnet34 \
      --workdir=workdirs/imagenet_resnet18_kd

The paper reports 73.31% (ResNet-34), 69.75% (ResNet-18), 70.66% (KD) top-1.
Not run on this project's CPU machine.
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('resnet34')
STUDENT = config_lib.model_config('resnet18')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/imagenet_resnet34'
  config_lib.imagenet_recipe(c, batch_size=256, learning_rate=0.1)
  c.distill.temperature = 1.0
  c.distill.alpha = 0.5
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  return config_lib.apply_role(c, TEACHER, STUDENT)


def _runlocal(c):
  config_lib.shrink_imagenet_for_runlocal(c)
