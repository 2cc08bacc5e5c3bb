r"""CIFAR-100, resnet32x4 -> resnet8x4 with the CRD benchmark protocol.

Tian, Krishnan & Isola (2020), "Contrastive Representation Distillation":
240 epochs, batch 64, SGD momentum 0.9, lr 0.05 decayed x0.1 at epochs 150,
180 and 210, weight decay 5e-4, random crop + flip; KD with T = 4 and weight
0.9 on the soft term (their -a 0.9 -r 0.1). For a GPU/TPU with TFDS cifar100:

  python -m kd_jax.main --config=configs/cifar100_crd.py:role=teacher \
      --workdir=workdirs/cifar100_resnet32x4
  python -m kd_jax.main --config=configs/cifar100_crd.py:role=student \
      --workdir=workdirs/cifar100_resnet8x4
  python -m kd_jax.main \
      --config=configs/cifar100_crd.py:role=distill,teacher_workdir=workdirs/cifar100_resnet32x4 \
      --workdir=workdirs/cifar100_resnet8x4_kd

The paper reports 79.42% (teacher), 72.50% (student), 73.33% (KD) top-1.
Not run on this project's CPU machine (240 epochs of ResNets).
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('resnet32x4')
STUDENT = config_lib.model_config('resnet8x4')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/cifar100_resnet32x4'
  config_lib.cifar100_recipe(c)
  c.distill.temperature = 4.0
  c.distill.alpha = 0.9
  config_lib.parse_arg(c, arg)
  return config_lib.apply_role(c, TEACHER, STUDENT)
