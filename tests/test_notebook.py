"""experiments/colab_tpu.ipynb runs headless, data-parallel, end to end.

The notebook runs in a separate kernel process with this process's environment
(conftest: 8 simulated CPU devices, a private TFDS data_dir); a cell injected
after its 'parameters' cell makes the runs tiny and offline (mnist5k,
runlocal), as papermill would.
"""

import json
import os

import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'experiments', 'colab_tpu.ipynb')


def _outputs_text(cell) -> str:
  texts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream':
      texts.append(output['text'])
    elif 'data' in output:
      texts.append(output['data'].get('text/plain', ''))
  return ''.join(texts)


def _parameterised(workdir: str) -> nbformat.NotebookNode:
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [i for i, c in enumerate(notebook.cells)
            if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(tagged) == 1, 'the notebook needs exactly one parameters cell'
  overrides = nbformat.v4.new_code_cell('\n'.join([
      "CONFIG_ARG = 'runlocal'",
      "DATASET = 'mnist5k'",
      "ROLES = ('teacher', 'distill')",
      f'WORKDIR = {workdir!r}',
  ]))
  notebook.cells.insert(tagged[0] + 1, overrides)
  return notebook


@pytest.mark.extended  # A kernel process that trains two runs.
def test_notebook_distils_over_all_devices_and_prints_the_table(tmp_path):
  workdir = str(tmp_path / 'runs')
  notebook = _parameterised(workdir)
  client = nbclient.NotebookClient(
      notebook, timeout=240, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()

  text = '\n'.join(_outputs_text(c) for c in notebook.cells
                   if c.cell_type == 'code')
  assert '8 devices, backend cpu' in text
  for role in ('teacher', 'distill'):
    with open(os.path.join(workdir, role, 'summary.json')) as f:
      summary = json.load(f)
    assert summary['step'] == 6  # runlocal's num_train_steps
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read().splitlines()
  assert table[0].startswith('| run | test acc |')
  assert [row.split('|')[1].strip() for row in table[2:]] == [
      'teacher', 'distill']
  # The distilled student reports agreement with its teacher; the teacher not.
  assert table[2].rstrip(' |').endswith('-')
  assert table[3].rstrip(' |').endswith('%')
  assert '| distill |' in text  # The table is printed in the notebook too.
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 0
