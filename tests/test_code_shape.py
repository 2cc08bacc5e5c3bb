"""The code's shape targets: no function in kd_jax/ over 100 lines
(docstring included) and the image train step under 70."""

import ast
import pathlib

import kd_jax

PACKAGE = pathlib.Path(kd_jax.__file__).parent
MAX_LINES = 100
MAX_TRAIN_STEP = 70


def function_lengths():
  for path in sorted(PACKAGE.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f'{path.relative_to(PACKAGE.parent)}:{node.name}'
        yield name, node.end_lineno - node.lineno + 1


def test_no_function_is_over_100_lines():
  lengths = dict(function_lengths())
  assert len(lengths) > 500  # The walk found the package.
  assert {k: v for k, v in lengths.items() if v > MAX_LINES} == {}


def test_the_train_step_is_under_70_lines():
  lengths = dict(function_lengths())
  assert lengths['kd_jax/train.py:train_step'] < MAX_TRAIN_STEP
