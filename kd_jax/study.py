"""What the experiment scripts share: configs with overrides, run-or-read, and
statistics over seeds.

A study is a list of runs, each a config and a workdir. `run_or_read` trains a
run with `train.train_and_evaluate` unless its workdir already holds a
finished run, whose summary it reads (an unfinished one resumes from its
checkpoint), so a study that was stopped continues where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kd_jax import config_lib
from kd_jax import rundir

def make_config(name: str, arg: str = '',
                overrides: Mapping[str, Any] | None = None):
  """`configs/<name>.py:<arg>` with dotted `overrides` set on top.

  Values that hold commas (tuples such as `model.hidden`, split slices) go
  through `overrides`: the config arg splits on top-level commas only.
  """
  config = config_lib.load_config(name, arg)
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The summary of a finished run, or None while it is unfinished."""
  return rundir.read_summary(workdir)


def check_finished_config(config, workdir: str) -> None:
  """Raises ValueError if the finished run in `workdir` was trained with
  a config other than `config` (`rundir.config_diff`: fields added since
  with their defaults are no difference), so that a study never reports a
  run it did not ask for."""
  diff = rundir.stored_config_diff(workdir, rundir.config_json(config))
  if diff:
    raise ValueError(
        f'workdir {workdir!r} holds a finished run of a different config '
        f'(fields that differ: {diff}); a study reads a finished run only '
        'for the config it asks for. Give the study another --workdir, or '
        'move that run aside to train it again.')


def run_or_read(config, workdir: str) -> tuple[dict[str, Any], bool]:
  """(summary, whether this call trained it) of one run: an image run
  (`train`), or a language model's (`lm_train`, task 'lm')."""
  summary = read_summary(workdir)
  if summary is not None:
    check_finished_config(config, workdir)
    return summary, False
  if hasattr(config, 'get') and config.get('task') == 'lm':
    from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
    return lm_train.train_and_evaluate(config, workdir), True
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir), True


def run_all(runs: Sequence[dict[str, Any]],
            make: Callable[[dict[str, Any]], Any],
            log: Callable[[str], None] = print,
            record_divergence: bool = False) -> tuple[int, float]:
  """Runs (or reads) each run dict in order; sets run['summary'].

  Each run dict has 'name' and 'workdir'; `make(run)` returns its config.
  With `record_divergence`, a run whose loss becomes NaN or Inf (the
  trainer's FloatingPointError) is a result, not a failure of the study:
  its run['summary'] is None and run['diverged'] the error (it trains again,
  and diverges again, when the study is rerun). Returns (how many were
  trained now, wall seconds).
  """
  start = time.perf_counter()
  trained = 0
  for i, run in enumerate(runs, start=1):
    t0 = time.perf_counter()
    try:
      summary, now = run_or_read(make(run), run['workdir'])
    except FloatingPointError as e:
      if not record_divergence:
        raise
      run['summary'], run['diverged'] = None, str(e)
      trained += 1
      log(f'[{i}/{len(runs)}] {run["name"]}: diverged after '
          f'{time.perf_counter() - t0:.0f} s ({str(e).split(";")[0]})')
      continue
    run['summary'] = summary
    trained += now
    how = (f'trained in {time.perf_counter() - t0:.0f} s' if now
           else 'finished before, read')
    log(f'[{i}/{len(runs)}] {run["name"]}: {how}; '
        + ', '.join(f'{split} errors {r["errors"]:g}'
                    for split, r in summary['eval'].items())
        + f' ({time.perf_counter() - start:.0f} s elapsed)')
  return trained, time.perf_counter() - start


def errors(summary: Mapping[str, Any], split: str) -> int:
  """Errors of a finished run on one eval split."""
  return int(summary['eval'][split]['errors'])


def stats(values: Iterable[float]) -> dict[str, Any]:
  """Mean, sample std, min, max and the values themselves."""
  v = np.asarray(list(values), float)
  return dict(values=v.tolist(), mean=float(v.mean()),
              std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
              min=float(v.min()), max=float(v.max()))


def gap_recovered(scratch: float, distilled: float, teacher: float) -> float:
  """Share of the teacher-student error gap that distillation closes."""
  gap = scratch - teacher
  return float('nan') if gap == 0 else (scratch - distilled) / gap


def eval_history(workdir: str, tag: str) -> list[tuple[int, float]]:
  """(step, value) of one scalar (e.g. 'test/accuracy') from a run's events."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0,
                              event_accumulator.SCALARS: 0})
  acc.Reload()
  tags = acc.Tags()
  if tag in tags.get('tensors', []):
    events = acc.Tensors(tag)
    return [(e.step, float(np.asarray(
        __import__('tensorflow').make_ndarray(e.tensor_proto))))
            for e in events]
  if tag in tags.get('scalars', []):
    return [(e.step, float(e.value)) for e in acc.Scalars(tag)]
  return []


def fmt(s: Mapping[str, Any], digits: int = 1) -> str:
  """'mean +- std' of a `stats` dict."""
  if math.isnan(s['mean']):
    return 'n/a'
  return f'{s["mean"]:.{digits}f} +- {s["std"]:.{digits}f}'


def error_bars(ax, rows: Sequence[Mapping[str, Any]],
               labels: Mapping[str, str], teacher: float,
               colors: Mapping[str, str] | None = None) -> None:
  """Draws each row's mean test errors +- std (rows hold 'method' and a
  'test' `stats` dict) on a matplotlib axis, with the teacher's errors as a
  dashed line and `labels[method]` under the bars (default colour C0)."""
  colors = colors or {}
  ax.bar(range(len(rows)), [r['test']['mean'] for r in rows],
         yerr=[r['test']['std'] for r in rows], capsize=3,
         color=[colors.get(r['method'], 'C0') for r in rows])
  ax.axhline(teacher, color='C3', ls='--', label='teacher')
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([labels[r['method']] for r in rows], rotation=45)
  ax.legend()
