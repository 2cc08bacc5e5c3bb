r"""ImageNet, ResNet-50 -> MobileNetV1 with KD: T = 1, weights 0.5 / 0.5.

The ResNet-50 -> MobileNetV1 row of the ImageNet KD tables (OFD, ReviewKD,
DKD), with mdistiller's recipe (`configs/imagenet/r50_mv1/kd.yaml`): 100
epochs, batch 512, SGD momentum 0.9, lr 0.2 decayed x0.1 at epochs 30, 60
and 90, weight decay 1e-4, random-resized crop + flip at 224 px, bfloat16
compute; 0.5 cross-entropy + 0.5 KL at T = 1. Needs imagenet2012 prepared in
config.data_dir (TFDS manual download):

  python -m kd_jax.main \
      --config=configs/imagenet_resnet50_mobilenetv1.py:role=teacher,data_dir=DIR \
      --workdir=workdirs/imagenet_resnet50
  python -m kd_jax.main \
      --config=configs/imagenet_resnet50_mobilenetv1.py:role=distill,data_dir=DIR,teacher_workdir=workdirs/imagenet_resnet50 \
      --workdir=workdirs/imagenet_mobilenetv1_kd

Zhao et al. (2022, DKD), Table 3, report 76.16% (ResNet-50), 68.87%
(MobileNetV1 alone) and 68.58% (MobileNetV1 with KD) top-1. Not run here:
this project's machine has neither ImageNet nor an accelerator. `runlocal`
trains at 32 px with a ResNet-8 standing in for the ResNet-50 teacher.
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('resnet50')
STUDENT = config_lib.model_config('mobilenetv1')
RUNLOCAL_TEACHER = config_lib.model_config('resnet8')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/imagenet_resnet50'
  config_lib.imagenet_recipe(c, batch_size=512, learning_rate=0.2)
  c.distill.temperature = 1.0
  c.distill.alpha = 0.5
  c.runlocal_models = False
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  teacher = RUNLOCAL_TEACHER if c.runlocal_models else TEACHER
  return config_lib.apply_role(c, teacher, STUDENT)


def _runlocal(c):
  config_lib.shrink_imagenet_for_runlocal(c)
  c.num_train_steps = 2
  c.runlocal_models = True
