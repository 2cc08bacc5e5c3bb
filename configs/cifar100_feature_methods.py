r"""CIFAR-100, resnet32x4 -> resnet8x4: the RepDistiller feature methods.

One file, one method per `method=` (default crd), each as RepDistiller's
benchmark runs it (Tian et al. 2020, `scripts/run_cifar_distill.sh`: 240
epochs, batch 64, SGD momentum 0.9, lr 0.05 decayed x0.1 at epochs 150, 180,
210, weight decay 5e-4, random crop + flip; CE weight 1 (`-r 1`), KD weight 0
(`-a 0`) except crd_kd), with the features their `train_student.py` reads
(`feat[k]` of `model(x, is_feat=True)`, here by name:
kd_jax/models/features.py) and the top-1 that RepDistiller's README table
(the CRD paper's Table 1) reports for this pair (teacher 79.42, student
72.50, KD 73.33; CRD+KD from the paper's table):

| method | term (config.distill.features) | weight | published top-1 |
|---|---|---|---|
| fitnet | hint: stage2 through a FitNets regressor | 100 | 73.50 |
| at | attention transfer on stage1-3 | 1000 | 73.44 |
| sp | similarity preserving on stage3 | 3000 | 72.94 |
| cc | correlation congruence of 128-d linear embeddings | 0.02 | 72.97 |
| vid | VID on stage1-3, one regressor each | 1 | 73.09 |
| rkd | RKD (distance 25, angle 50) on the embedding | 1 | 71.90 |
| pkt | PKT on the embedding | 30000 | 73.64 |
| crd | CRD: 128-d heads, 16384 negatives, tau 0.07, momentum 0.5 | 0.8 | 75.51 |
| crd_kd | CRD as above + KD at T=4 (`-r 1 -a 1 -b 0.8`) | 0.8 | 75.46 |
| ofd | OFD on preact1-3 (stage i of 3 weighs 2^-(3-i)), 1x1 connectors | 1e-3 | 74.95 |
| reviewkd | ReviewKD: stage1-3 + embedding fused (ABF) -> preact1-3 + embedding, HCL, warm-up 20 epochs | 5 | 75.63 |

OFD and ReviewKD are set as mdistiller runs them (configs/cifar100/ofd.yaml,
reviewkd.yaml with its defaults; their figures are mdistiller's table).
kd_jax's OFD margin comes from the teacher's pre-ReLU statistics over the
batch instead of its BN params (kd_jax/methods/feature/ofd.py says why).

Not run here: this project's machine has no CIFAR-100 offline, and 240
epochs of ResNets is GPU work. The figures above are the authors', not ours.
With TFDS cifar100 available:

  python -m kd_jax.main --config=configs/cifar100_feature_methods.py:role=teacher \
      --workdir=workdirs/cifar100_resnet32x4
  python -m kd_jax.main \
      --config=configs/cifar100_feature_methods.py:method=crd,teacher_workdir=workdirs/cifar100_resnet32x4 \
      --workdir=workdirs/cifar100_resnet8x4_crd
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('resnet32x4')
STUDENT = config_lib.model_config('resnet8x4')
STAGES = ('stage1', 'stage2', 'stage3')
PREACTS = ('preact1', 'preact2', 'preact3')


def _term(method, student, teacher, weight, **options):
  return dict(method=method, student=student, teacher=teacher, weight=weight,
              **options)


CRD = _term('crd', 'embedding', 'embedding', 0.8, dim=128,
            num_negatives=16384, temperature=0.07, momentum=0.5)

METHODS = {
    'fitnet': _term('fitnet', 'stage2', 'stage2', 100.0),
    'at': _term('at', STAGES, STAGES, 1000.0, p=2),
    'sp': _term('sp', 'stage3', 'stage3', 3000.0),
    'cc': _term('cc', 'embedding', 'embedding', 0.02, dim=128),
    'vid': _term('vid', STAGES, STAGES, 1.0),
    'rkd': _term('rkd', 'embedding', 'embedding', 1.0, distance_weight=25.0,
                 angle_weight=50.0),
    'pkt': _term('pkt', 'embedding', 'embedding', 30000.0),
    'crd': CRD,
    'crd_kd': CRD,
    'ofd': _term('ofd', PREACTS, PREACTS, 1e-3, kernel_size=1),
    'reviewkd': _term('reviewkd', (*STAGES, 'embedding'),
                      (*PREACTS, 'embedding'), 5.0, warmup_epochs=20.0),
}


def _base():
  c = config_lib.default_config()
  c.role = 'distill'
  c.method = 'crd'
  c.teacher_workdir = 'workdirs/cifar100_resnet32x4'
  config_lib.cifar100_recipe(c)
  return c


def get_config(arg=None):
  # The method sets defaults that the rest of the arg may still override.
  method = config_lib.parse_arg(_base(), arg).method
  if method not in METHODS:
    raise ValueError(
        f'method={method!r}; choose one of {tuple(METHODS)} '
        f'(--config=configs/cifar100_feature_methods.py:method=crd).')
  c = _base()
  c.distill.features = (METHODS[method],)
  c.distill.temperature = 4.0
  c.distill.soft_weight = 1.0 if method == 'crd_kd' else 0.0
  c.distill.hard_weight = 1.0
  config_lib.parse_arg(c, arg)
  if c.role != 'distill':
    # The teacher and the scratch student train on labels alone.
    c.distill.features = ()
    c.distill.soft_weight = None
    c.distill.hard_weight = None
  return config_lib.apply_role(c, TEACHER, STUDENT)
