"""What a short run pays besides training: imports and compiles.

Each check runs in a fresh interpreter, since what a process has imported and
JAX's compilation-cache settings are process-wide.
"""

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, tmp_path) -> str:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  done = subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                        capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.slow  # A fresh interpreter importing the library: ~30 s.
def test_library_imports_without_tensorflow_until_data_is_read(tmp_path):
  """...and the CLIs' quiet import of TensorFlow writes nothing, though
  `import jax` has set TF_CPP_MIN_LOG_LEVEL=1 (where it was unset)."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  done = subprocess.run([sys.executable, '-c', textwrap.dedent("""
      import os, sys
      import kd_jax.losses, kd_jax.models, kd_jax.train
      print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'clu')
                   if m in sys.modules))
      print(os.environ['TF_CPP_MIN_LOG_LEVEL'])
      from kd_jax import progress
      with progress.quiet_native_imports(sys.argv):
        import tensorflow
      print(os.environ['TF_CPP_MIN_LOG_LEVEL'])
      print('imported', file=sys.stderr, flush=True)
      from kd_jax import input_pipeline
      # The first TFDS use loads it and registers the offline datasets.
      builder = input_pipeline.tfds.builder('mnist5k')
      print(type(builder).__name__, 'tensorflow' in sys.modules)
      """)], capture_output=True, text=True, env=env, cwd=tmp_path,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  imported, jax_level, quiet_level, used = done.stdout.splitlines()[-4:]
  assert imported == '[]'
  assert (jax_level, quiet_level) == ('1', '2')
  assert used == 'Mnist5k True'
  # Nothing on stderr before the quiet import ended.
  assert done.stderr.startswith('imported'), done.stderr[:500]


@pytest.mark.slow
def test_compilation_cache_flag_writes_entries(tmp_path):
  cache = tmp_path / 'cache'
  out = _run(f"""
      import jax, jax.numpy as jnp
      from kd_jax import main
      main.use_compilation_cache({str(cache)!r})
      print(float(jax.jit(lambda x: jnp.tanh(x) * 2)(jnp.ones(3)).sum()))
      """, tmp_path)
  assert abs(float(out.splitlines()[-1]) - 6 * 0.7615941559557649) < 1e-5
  # A program this small and quick to compile is below JAX's default
  # thresholds (1 s of compile time); the flag caches it all the same.
  assert [p for p in cache.iterdir() if p.is_file()]

