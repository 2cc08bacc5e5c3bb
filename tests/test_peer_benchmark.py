"""experiments/peer_benchmark/token_kd.py: kd_jax's token KD step against a
nanoGPT-style PyTorch loop (PyTorch is the optional 'bench' extra)."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'experiments', 'peer_benchmark', 'token_kd.py')


@pytest.mark.slow  # Two worker processes, four JAX steps compiled.
def test_token_kd_benchmark_checks_pytorch_against_jax_then_times_both(
    tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'results.json'
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, SCRIPT, '--tiny', '--threads=1', '--rounds=1',
       '--steps=1', f'--out={out}'], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  record = json.loads(out.read_text())
  [measured] = record['results']
  check = measured['check']
  # The same weights and batch: the same KD loss, step after step, and the
  # steps move it (the last warm-up step has a non-zero learning rate).
  assert len(check['jax_kd_losses']) == record['warmup'] == 3
  assert check['max_abs_loss_diff'] <= 1e-5
  assert check['jax_kd_losses'][-1] != check['jax_kd_losses'][0]
  assert set(measured['round_seconds']) == {
      f'{side} {program}' for side in ('jax', 'torch')
      for program in ('kd', 'kd_minimal', 'student', 'student_minimal')}
  for times in measured['round_seconds'].values():
    assert len(times) == 1 and math.isfinite(times[0]) and times[0] > 0
  assert all(v > 0 for v in measured['kd_peak_rss'].values())
  assert record['table'] in result.stdout
