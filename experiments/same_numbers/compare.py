"""Compares every summary.json under OLD with the one at the same path under
NEW: the same numbers, timings and paths left out.

  python experiments/same_numbers/compare.py OLD_ROOT NEW_ROOT
"""

import glob
import json
import os
import sys

# Wall-clock figures differ between any two runs; history keys added later
# (param_norm) are not in the older summaries.
SKIPPED = ('second', 'time', 'param_norm')


def numbers(value, path=''):
  """{path: number} of every int or float in a JSON value."""
  if isinstance(value, dict):
    out = {}
    for key, item in value.items():
      if not any(word in key for word in SKIPPED):
        out.update(numbers(item, f'{path}/{key}'))
    return out
  if isinstance(value, list):
    out = {}
    for i, item in enumerate(value):
      out.update(numbers(item, f'{path}[{i}]'))
    return out
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return {path: value}
  return {}


def main(old_root: str, new_root: str) -> int:
  same = total = 0
  for old in sorted(glob.glob(os.path.join(old_root, '**', 'summary.json'),
                              recursive=True)):
    rel = os.path.relpath(old, old_root)
    new = os.path.join(new_root, rel)
    if not os.path.exists(new):
      print(f'{rel}: only in {old_root}')
      continue
    with open(old) as f:
      a = numbers(json.load(f))
    with open(new) as f:
      b = numbers(json.load(f))
    total += 1
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
      print(f'{rel}: {len(differ)} numbers differ, e.g. {differ[0]}: '
            f'{a.get(differ[0])} vs {b.get(differ[0])}')
    else:
      same += 1
  print(f'{same} of {total} summaries the same in every number')
  return 0 if same == total else 1


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:3]))
