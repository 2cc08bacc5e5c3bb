"""Shared test set-up, made once per test session and shared by the
pytest-xdist workers and by the subprocesses that tests start.

- 8 simulated CPU devices, so every test runs data-parallel.
- One scratch directory per session (the controller makes it; workers and
  subprocesses inherit its path through the environment), removed at the end.
  Its TFDS data_dir (TFDS_DATA_DIR, the `data_dir` fixture) gets mnist5k and
  digits prepared once, offline, under a file lock, so tests never touch
  ~/tensorflow_datasets and workers never race on preparing.
- A persistent XLA compilation cache (.pytest_cache/d/kd_jax_xla, or
  $KD_JAX_TEST_XLA_CACHE), with its size and compile-time thresholds at 0, so
  that the tiny runs that many tests repeat compile each program once.
- `jax_disable_most_optimizations` in the test processes: the runs here are
  tiny, so XLA's optimisation passes cost more time than they save. Tests
  that compare two runs compare two runs compiled alike; subprocesses (the CLI
  tests, the notebook, the benchmarks) keep XLA's defaults.
- `mnist5k_teacher_dir`: one runlocal mnist5k teacher per session, trained by
  the first worker that needs it, for every test that distils from it; more
  such runs through `finished_run`.
- Under pytest-xdist, the tests of a module marked `xdist_group` run on one
  worker (`pytest_xdist_make_scheduler`), so that its costly fixtures are
  built once; other tests are spread one by one, as `--dist load` does.
  Those fixtures are session-scoped: the worker may run other modules'
  tests between a group's, and a module-scoped fixture would be torn down
  and built again each time.
"""

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_SESSION_ENV = 'KD_JAX_TEST_SESSION_DIR'
# Set by the first process of the session (the xdist controller, or the only
# process); workers and subprocesses see it already set and share the dir.
_OWNS_SESSION_DIR = _SESSION_ENV not in os.environ
if _OWNS_SESSION_DIR:
  os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix='kd_jax_tests_')
SESSION_DIR = os.environ[_SESSION_ENV]
os.environ['TFDS_DATA_DIR'] = os.path.join(SESSION_DIR, 'tfds')

# jax reads these when it is imported; subprocesses inherit them.
os.environ.setdefault('KD_JAX_TEST_XLA_CACHE', os.path.join(
    REPO, '.pytest_cache', 'd', 'kd_jax_xla'))
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['KD_JAX_TEST_XLA_CACHE']
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_compilation_cache_dir',
                  os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
jax.config.update('jax_disable_most_optimizations', True)


@contextlib.contextmanager
def session_lock(name: str):
  """An exclusive lock, across the session's processes, on `name`."""
  os.makedirs(SESSION_DIR, exist_ok=True)
  with open(os.path.join(SESSION_DIR, f'{name}.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _no_network(*args, **kwargs):
  raise OSError('network disabled by the test')


def prepare_offline_datasets() -> str:
  """Prepares mnist5k and digits, without network, into TFDS_DATA_DIR."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from kd_jax import datasets  # pylint: disable=g-import-not-at-top,unused-import  # Registers the builders.
  data_dir = os.environ['TFDS_DATA_DIR']
  with session_lock('tfds'), pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket, 'create_connection', _no_network)
    patch.setattr(socket.socket, 'connect', _no_network)
    # What the tests read through TFDS_DATA_DIR; the builders of packages
    # installed with --no-deps (mnist_full, shakespeare_char) are tested
    # on their own data_dirs.
    for name in ('mnist5k', 'digits'):
      builder = tfds.builder(name, data_dir=data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare()
  return data_dir


@pytest.fixture(scope='session', autouse=True)
def data_dir():
  """The session's TFDS data_dir, with the offline datasets prepared.

  Prepared before the first test when the collected tests import the input
  pipeline or the builders (most of them then read mnist5k through
  TFDS_DATA_DIR); sessions of pure unit tests skip the preparing.
  """
  if {'kd_jax.input_pipeline', 'kd_jax.datasets'} & set(sys.modules):
    return prepare_offline_datasets()
  return os.environ['TFDS_DATA_DIR']


def _finished_run(name: str, arg: str = 'runlocal') -> str:
  from kd_jax import rundir  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  from kd_jax.config_lib import load_config  # pylint: disable=g-import-not-at-top
  prepare_offline_datasets()
  key = f'{name}:{arg}'.replace('/', '_').replace('=', '-').replace(',', '+')
  workdir = os.path.join(SESSION_DIR, 'runs', key)
  with session_lock(f'run_{key}'):
    if not rundir.is_finished(workdir):
      train.train_and_evaluate(load_config(name, arg), workdir)
  return workdir


@pytest.fixture(scope='session')
def finished_run():
  """`finished_run(name, arg='runlocal')`: the workdir of a finished run of
  configs/<name>.py:arg, trained once per session by the first process that
  asks. Shared: read it, or copy it (shutil.copytree) to change it."""
  return _finished_run


@pytest.fixture(scope='session')
def mnist5k_teacher_dir():
  """The workdir of a finished `mnist5k_teacher:runlocal` run (read-only)."""
  return _finished_run('mnist5k_teacher')


def _grouped_modules() -> set[str]:
  """Test files whose module sets `pytestmark = pytest.mark.xdist_group(...)`."""
  here = os.path.dirname(os.path.abspath(__file__))
  grouped = set()
  for name in os.listdir(here):
    if name.endswith('.py'):
      with open(os.path.join(here, name)) as f:
        if any(line.startswith('pytestmark = pytest.mark.xdist_group(')
               for line in f):
          grouped.add(name)
  return grouped


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Under `-n N` (--dist=load): a module marked `xdist_group` is one unit of
  work, sent whole to one worker, and every other test its own unit.

  xdist's own --dist=loadgroup does this by suffixing node ids with the
  group, which pytest 9.2's structured node ids ignore (the groups are
  silently spread over the workers: pytest-xdist issue 1386); this
  scheduler groups by file name in the controller instead.
  """
  if config.getvalue('dist') != 'load':
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  grouped = _grouped_modules()

  class ModuleGroupScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      path = nodeid.split('::', 1)[0]
      return path if os.path.basename(path) in grouped else nodeid

  return ModuleGroupScheduling(config, log)


def pytest_sessionfinish(session):
  if _OWNS_SESSION_DIR and not hasattr(session.config, 'workerinput'):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


# Doctests of modules whose examples compile for seconds (the decoder and its
# generation) run with the slow set.
_SLOW_DOCTEST_MODULES = ('kd_jax/generation.py', 'kd_jax/models/decoder.py')


# Parametrized tests whose default-set run keeps only these cases (pytest's
# ids); their other cases, each a further compile of the same code path, run
# with the slow set.
DEFAULT_CASES = {
    'test_losses.py::test_where_mask_equals_slicing': ('ce-kl',),
    'test_losses.py::test_gradients_match_finite_differences': (
        'kl', 'cross_entropy', 'distillation_loss'),
    'test_losses.py::test_jit_and_vmap_match_eager': (
        'kl', 'combine_teachers', 'distillation_loss'),
    'test_losses.py::test_extreme_logits_and_temperatures_stay_finite': (
        'ce-kl-0.05', 'ce-kl-100.0', 'mse-soft_ce-0.05', 'ce-logit_mse-100.0'),
    'test_losses.py::test_topk_kl_divergence_matches_numpy_bucket_kl': (
        '4.0-1', '4.0-3', '1.0-9'),
    'test_logit_losses.py::test_dkd_matches_numpy_reference': (
        '4.0-shape1',),
    'test_logit_losses.py::test_dist_matches_numpy_reference': (
        '4.0-shape1',),
    'test_logit_losses.py::test_extreme_logits_give_finite_values_and_gradients':
        ('dkd-20.0', 'dist-0.5', 'kd_ls-20.0'),
    'test_faults.py::test_damaged_newest_checkpoint_falls_back_and_is_moved_aside':
        ('truncate', 'empty_metadata_json'),
    'test_faults_teachers.py::test_a_damaged_teacher_checkpoint_is_refused_naming_the_entry_and_step':
        ('truncate',),
    'test_input_pipeline.py::test_eval_counts_every_example_once': (
        '8-2-64',),
    'test_objective.py::test_dist_step_on_one_device_equals_eight': (
        'global',),
    'test_objective.py::test_ctkd_temperature_gradient_is_reversed_and_scaled':
        ('global',),
    'test_specialist_pipeline.py::test_every_role_runs_the_validated_mnist5k_recipe':
        ('distill', 'specialist,specialist.index=0'),
    'test_zoo.py::test_feature_shapes_are_the_reference_positions': (
        'resnet8', 'vgg8', 'mobilenetv2', 'shufflenetv1', 'wrn_16_1'),
}


def _default_case(item) -> bool:
  """False for a case that DEFAULT_CASES leaves to the slow set."""
  callspec = getattr(item, 'callspec', None)
  if callspec is None:
    return True
  key = f'{item.path.name}::{item.originalname}'
  return key not in DEFAULT_CASES or callspec.id in DEFAULT_CASES[key]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Before `-m` deselects: an `extended` test is also `slow` (the default
  command skips both; CI's `-m "slow and not extended"` skips it); the
  doctests of `_SLOW_DOCTEST_MODULES` and the cases that `DEFAULT_CASES`
  leaves out are `slow`."""
  cases = {f'{i.path.name}::{getattr(i, "originalname", i.name)}'
           f'[{i.callspec.id}]' for i in items if hasattr(i, 'callspec')}
  if len(items) > 1000:  # A whole-suite collection: check the table.
    unknown = [f'{k}[{c}]' for k, ids in DEFAULT_CASES.items() for c in ids
               if f'{k}[{c}]' not in cases]
    if unknown:
      raise pytest.UsageError(f'tests/conftest.py DEFAULT_CASES names cases '
                              f'that do not exist: {unknown}')
  for item in items:
    path = str(item.path).replace(os.sep, '/')
    if item.get_closest_marker('extended') or not _default_case(item) or (
        type(item).__name__ == 'DoctestItem'
        and path.endswith(_SLOW_DOCTEST_MODULES)):
      item.add_marker(pytest.mark.slow)
