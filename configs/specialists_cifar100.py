r"""Specialist ensembles (Hinton et al. 2015, sec. 5) on CIFAR-100.

The groups are CIFAR-100's 20 coarse classes (superclasses), given by hand:
20 specialists of 5 fine classes each plus a dustbin, all starting from a
ResNet-32x4 generalist; the combination is distilled into a ResNet-8x4 with
the CRD protocol of configs/cifar100_crd.py (T = 4, alpha = 0.9). For a
GPU/TPU with TFDS cifar100:

  R=workdirs/specialists_cifar100
  python -m kd_jax.main --config=configs/specialists_cifar100.py:role=generalist \
      --workdir=$R/generalist
  for k in $(seq 0 19); do
    python -m kd_jax.main \
        --config=configs/specialists_cifar100.py:role=specialist,specialist.index=$k \
        --workdir=$R/specialist_$k
  done
  python -m kd_jax.specialists.evaluate \
      --config=configs/specialists_cifar100.py:role=distill --out=$R/combination
  python -m kd_jax.main --config=configs/specialists_cifar100.py:role=distill \
      --workdir=$R/distill
  python -m kd_jax.main --config=configs/specialists_cifar100.py:role=student \
      --workdir=$R/student

`group_source=cluster` clusters the generalist's confusions instead (20
groups of any size): after the generalist, run

  python -m kd_jax.specialists.cluster \
      --config=configs/specialists_cifar100.py:role=generalist,group_source=cluster \
      --workdir=$R/generalist

and pass `group_source=cluster` to every later command. Cost: the generalist
is the CRD teacher run (240 epochs), each specialist 30 epochs of it, and the
distill step runs all 21 ResNet-32x4s forward on every batch.
Not run on this project's CPU machine. `:runlocal` is a smoke run: small
CNNs and two specialists of ten superclasses each (so that 24 mock examples
hold examples inside and outside each group).
"""

from kd_jax import config_lib

# TFDS cifar100 'label' names (alphabetical); index = label.
FINE_CLASSES = (
    'apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl '
    'boy bridge bus butterfly camel can castle caterpillar cattle chair '
    'chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur '
    'dolphin elephant flatfish forest fox girl hamster house kangaroo '
    'keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree '
    'motorcycle mountain mouse mushroom oak_tree orange orchid otter '
    'palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum '
    'rabbit raccoon ray road rocket rose sea seal shark shrew skunk '
    'skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper '
    'table tank telephone television tiger tractor train trout tulip turtle '
    'wardrobe whale willow_tree wolf woman worm').split()

# The 20 superclasses ('coarse_label' order) and their fine classes.
SUPERCLASSES = (
    ('aquatic_mammals', 'beaver dolphin otter seal whale'),
    ('fish', 'aquarium_fish flatfish ray shark trout'),
    ('flowers', 'orchid poppy rose sunflower tulip'),
    ('food_containers', 'bottle bowl can cup plate'),
    ('fruit_and_vegetables', 'apple mushroom orange pear sweet_pepper'),
    ('household_electrical_devices',
     'clock keyboard lamp telephone television'),
    ('household_furniture', 'bed chair couch table wardrobe'),
    ('insects', 'bee beetle butterfly caterpillar cockroach'),
    ('large_carnivores', 'bear leopard lion tiger wolf'),
    ('large_man-made_outdoor_things', 'bridge castle house road skyscraper'),
    ('large_natural_outdoor_scenes', 'cloud forest mountain plain sea'),
    ('large_omnivores_and_herbivores',
     'camel cattle chimpanzee elephant kangaroo'),
    ('medium_mammals', 'fox porcupine possum raccoon skunk'),
    ('non-insect_invertebrates', 'crab lobster snail spider worm'),
    ('people', 'baby boy girl man woman'),
    ('reptiles', 'crocodile dinosaur lizard snake turtle'),
    ('small_mammals', 'hamster mouse rabbit shrew squirrel'),
    ('trees', 'maple_tree oak_tree palm_tree pine_tree willow_tree'),
    ('vehicles_1', 'bicycle bus motorcycle pickup_truck train'),
    ('vehicles_2', 'lawn_mower rocket streetcar tank tractor'),
)
# As class indices, so that they hold for mock data (whose names are '0'..).
COARSE_GROUPS = tuple(tuple(FINE_CLASSES.index(name) for name in names.split())
                      for _, names in SUPERCLASSES)

GENERALIST = config_lib.model_config('resnet32x4')
STUDENT = config_lib.model_config('resnet8x4')
SMALL = config_lib.model_config('cnn', features=(8, 16), dense=32)
ROLES = ('generalist', 'specialist', 'distill', 'student')


def _runlocal(c):
  config_lib.shrink_for_runlocal(c)
  c.small_models = True


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'generalist'
  c.root = 'workdirs/specialists_cifar100'
  c.group_source = 'coarse'      # coarse | cluster
  c.small_models = False
  c.dataset = 'cifar100'
  c.augment = 'cifar'
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.checkpoint_every_steps = 2000
  c.specialist.num_groups = 20
  c.specialist.top_n = 2
  c.specialist_epochs = 30.0
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  return apply_role(c)


def apply_role(c):
  """Sets model, schedule, groups and teachers for `c.role` under `c.root`."""
  if c.role not in ROLES:
    raise ValueError(f'config.role={c.role!r}; choose one of {ROLES}.')
  if c.group_source == 'coarse':
    c.specialist.groups = COARSE_GROUPS
    if c.small_models:  # Two groups of ten superclasses each.
      c.specialist.groups = tuple(
          sum(COARSE_GROUPS[half * 10:(half + 1) * 10], ()) for half in (0, 1))
  elif c.group_source == 'cluster':
    c.specialist.groups_file = f'{c.root}/groups.json'
  else:
    raise ValueError(f'config.group_source={c.group_source!r}; choose coarse '
                     'or cluster.')
  generalist = SMALL if c.small_models else GENERALIST
  generalist_dir = f'{c.root}/generalist'
  c.model = generalist if c.role in ('generalist', 'specialist') else (
      SMALL if c.small_models else STUDENT)
  # The CRD schedule: lr 0.05, x0.1 at epochs 150, 180 and 210 of 240.
  c.learning_rate = 0.05
  c.schedule = 'step'
  c.step_boundaries = (150 / 240, 180 / 240, 210 / 240)
  c.num_epochs = 240
  if c.role == 'specialist':
    if c.specialist.index < 0:
      raise ValueError('role=specialist needs config.specialist.index >= 0, '
                       'e.g. :role=specialist,specialist.index=0.')
    c.init_from = generalist_dir
    c.learning_rate = 0.01
    c.schedule = 'cosine'
    c.num_epochs = c.specialist_epochs
  elif c.specialist.index >= 0:
    raise ValueError(f'config.specialist.index={c.specialist.index} is for '
                     f'role=specialist, not role={c.role}.')
  if c.role == 'distill':
    c.distill.teacher_source = 'specialists'
    num_groups = (len(c.specialist.groups) if c.specialist.groups is not None
                  else c.specialist.num_groups)
    c.teachers = [config_lib.teacher_config(generalist, generalist_dir)] + [
        config_lib.teacher_config(generalist, f'{c.root}/specialist_{k}')
        for k in range(num_groups)]
    c.distill.temperature = 4.0
    c.distill.alpha = 0.9
  return c
