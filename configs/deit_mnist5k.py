r"""DeiT-style distillation on mnist5k: a ViT-Ti student from a ResNet-20 teacher.

Touvron et al. (2021), "Training data-efficient image transformers &
distillation through attention": a convnet teacher gives a ViT student more
than a transformer teacher does. Here sized to run on a CPU: mnist5k's 28x28
digits cut into 7x7 patches (16 tokens) for ViT-Ti (width 192, depth 12, 3
heads), AdamW (lr 1e-3, weight decay 0.05, 3 warm-up epochs, cosine) for 30
epochs, and DeiT's soft distillation: (1 - lambda) CE + lambda T^2 KL with
lambda = 0.1 and T = 3 on the class token's logits.

  python -m kd_jax.main --config=configs/deit_mnist5k.py:role=teacher \
      --workdir=workdirs/deit_mnist5k_resnet20
  python -m kd_jax.main --config=configs/deit_mnist5k.py:role=student \
      --workdir=workdirs/deit_mnist5k_vit
  python -m kd_jax.main \
      --config=configs/deit_mnist5k.py:role=distill,teacher_workdir=workdirs/deit_mnist5k_resnet20 \
      --workdir=workdirs/deit_mnist5k_vit_soft

`distill_token=True` gives the student DeiT's distillation token; its head's
logits come out of the model as the feature 'dist_logits' and need DeiT's
hard-label objective, which this config requires with the token:
distill.soft='deit_hard' trains 0.5 CE(class head, labels) + 0.5 CE(
distillation head, teacher argmax) (DeiT's hard distillation; alpha
defaults to 0.5 there), and evaluation averages the two heads (the model's
eval mode):

  python -m kd_jax.main \
      --config=configs/deit_mnist5k.py:distill_token=True,distill.soft=deit_hard,teacher_workdir=workdirs/deit_mnist5k_resnet20 \
      --workdir=workdirs/deit_mnist5k_vit_hard

`teacher=mnist5k_mlp` takes configs/mnist5k_teacher.py's 2x1200 MLP (trained
by that config) as the teacher, and `student=vit_mini` a four-block ViT
sized for a CPU: experiments/deit_mnist5k runs scratch, soft and hard
students that way over three seeds (its README has the results). Like the
other mnist5k configs this trains on `train[:3600]` and validates on
`train[3600:]`. `runlocal` swaps in a two-block ViT (`vit_tiny`, 4x4
patches) and, for the ResNet-20 teacher, a ResNet-8.
"""

from kd_jax import config_lib

# config.teacher: the teacher's architecture.
TEACHERS = {
    'resnet20': config_lib.model_config('resnet20'),
    # configs/mnist5k_teacher.py's 2x1200 MLP, trained by that config.
    'mnist5k_mlp': config_lib.model_config('mlp', hidden=(1200, 1200),
                                           dropout=0.5, input_dropout=0.2),
}
RUNLOCAL_TEACHER = config_lib.model_config('resnet8')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/deit_mnist5k_resnet20'
  c.teacher = 'resnet20'
  c.student = 'vit_ti16'
  c.patch_size = 7
  c.distill_token = False
  c.runlocal_models = False
  c.dataset = 'mnist5k'
  c.train_split = 'train[:3600]'
  c.eval_splits = ('train[3600:]', 'test')  # validation, test.
  c.augment = 'mnist_jitter'
  c.batch_size = 128
  c.optimizer = 'adamw'
  c.learning_rate = 1e-3
  c.weight_decay = 0.05
  c.schedule = 'cosine'
  c.num_epochs = 30
  c.warmup_steps = 3 * 3600 // 128
  c.checkpoint_every_steps = 500
  c.distill.temperature = 3.0
  c.distill.alpha = 0.1
  hard = lambda c: config_lib.method_name(c.distill.soft) == 'deit_hard'
  if hard(config_lib.parse_arg(c.copy_and_resolve_references(), arg,
                               runlocal=_runlocal)):
    c.distill.alpha = 0.5  # DeiT's hard distillation: labels and teacher.
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  if c.distill_token and c.role == 'distill' and not hard(c):
    raise ValueError(
        'config.distill_token=True trains the distillation head only with '
        "DeiT's hard-label objective: set distill.soft='deit_hard', or "
        'distill_token=False for soft distillation on the class token.')
  student = config_lib.model_config(c.student, patch_size=c.patch_size,
                                    distill_token=c.distill_token)
  if c.teacher not in TEACHERS:
    raise ValueError(f'config.teacher={c.teacher!r}; choose one of '
                     f'{tuple(TEACHERS)}.')
  if c.teacher == 'mnist5k_mlp' and c.role == 'teacher':
    raise ValueError(
        'config.teacher=mnist5k_mlp is trained by configs/mnist5k_teacher.py '
        '(the recipe chosen on validation); train it there and pass its '
        'workdir as teacher_workdir with role=distill.')
  teacher = (RUNLOCAL_TEACHER if c.runlocal_models and c.teacher == 'resnet20'
             else TEACHERS[c.teacher])
  if c.role != 'distill':
    c.distill.soft = 'kl'  # The teacher and the scratch student: labels only.
  return config_lib.apply_role(c, teacher, student)


def _runlocal(c):
  config_lib.shrink_for_runlocal(c)
  c.student = 'vit_tiny'
  c.patch_size = 4
  c.warmup_steps = 2
  c.runlocal_models = True
