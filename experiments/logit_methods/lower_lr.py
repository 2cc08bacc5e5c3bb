r"""Seed 0 of the 2x800 mnist5k student with MLKD at lr 0.01 and WTTM at lr
0.003 (the study's rate is 0.03, at which both diverge): do they train when
the rate is lowered? A check beside the study, not a row of it (one seed,
rates not chosen on validation).

  python experiments/logit_methods/lower_lr.py --workdir=workdirs/logit_methods

Reads the study's seed-0 mnist5k teacher from --workdir (run the study with
--datasets=mnist5k first); writes each run to <workdir>/<run>_lr<rate> and
prints validation and test errors as JSON.
"""

import argparse
import importlib.util
import json
import os

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
RATES = (('mlkd', 0.01), ('wttm', 0.003))


def main() -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/logit_methods')
  workdir = parser.parse_args().workdir
  spec = importlib.util.spec_from_file_location(
      'logit_methods', os.path.join(HERE, 'run.py'))
  methods = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(methods)
  args = methods.parse_args([f'--workdir={workdir}', '--datasets=mnist5k',
                             '--methods=mlkd,wttm', '--seeds=0',
                             '--widths=800'])
  runs = methods.plan_runs(args)
  teachers = {r['workdir']: study.make_config(r['config_name'], r['arg'],
                                              r['overrides'])
              for r in runs if r['method'] == 'teacher'}
  out = []
  for method, lr in RATES:
    run = dict(next(r for r in runs if r['method'] == method))
    run['overrides'] = {**run['overrides'], 'learning_rate': lr}
    run['name'] += f'_lr{lr:g}'
    run['workdir'] = os.path.join(workdir, run['name'])
    study.run_all([run], lambda r: methods.make(r, teachers),
                  record_divergence=True)
    summary = run['summary']
    out.append(dict(
        method=method, lr=lr,
        val=None if summary is None else study.errors(summary,
                                                      'train[3600:]'),
        test=None if summary is None else study.errors(summary, 'test')))
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
