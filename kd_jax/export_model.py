r"""A run's model as one ONNX or TFLite file: uint8 images in, logits out.

  pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1
  python -m kd_jax.export_model --workdir=workdirs/mnist5k_student \
      --format=onnx --out=student.onnx [--check_split=test] \
      [--check_examples=64] [--tolerance=1e-4]

The file holds the run's eval-mode model (its latest checkpoint, restored as
a teacher or a warm start restores it) behind the normalisation that the
run's input pipeline applies:

* input `image`: uint8 [N, H, W, C], (H, W, C) the run's image shape
  (run_info.json): images as the dataset stores them, resized as the eval
  pipeline does when the run resizes (bilinear, antialiased, rounded); N is
  dynamic;
* inside: `(image / 255 - mean) / std` with the run's per-channel constants
  (`kd_jax.data.preprocess.normalization` of its dataset, or the ones that
  imported weights expect, `kd_jax.import_teacher`);
* output: float32 logits [N, num_classes] (ONNX: `logits`).

Converters: ONNX by jax2onnx from the model's jaxpr, run by onnxruntime;
TFLite by jax2tf and TensorFlow's TFLite converter, run by LiteRT
(`ai_edge_litert`, else `tf.lite.Interpreter`). A conv net's TFLite file is
traced at batch 1 (fused convolutions that LiteRT runs in XNNPACK): its
signature says batch 1 and LiteRT's `resize_tensor_input` sets any other;
other models' files have a batch of -1 (`to_tflite`). jax2onnx is installed
with --no-deps: its orbax-checkpoint<0.11.37 pin would downgrade the orbax
that kd_jax checkpoints with.

The export checks itself before it writes --out: the file's logits on
--check_examples images of --check_split (default the run's first eval
split; random uint8 images, seed 0, for imported weights, which bring no
data) must equal the JAX model's within --tolerance x max(1, max |logits|),
at batch sizes N and 1; otherwise it fails naming the largest difference
and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import importlib
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import import_teacher
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax import progress
from kd_jax import rundir
from kd_jax import warm_start

FORMATS = ('onnx', 'tflite')
INSTALL = ("pip install -e '.[export]' && pip install --no-deps "
           'jax2onnx==0.17.1')
DEFAULT_TOLERANCE = 1e-4
RANDOM = 'random'  # --check_split for runs without data (imported weights).


class ExportMismatch(ValueError):
  """The exported file's logits differ from the JAX model's."""


class MissingConverter(ImportError):
  """A converter or runtime of the `export` extra is not installed."""


@dataclasses.dataclass(frozen=True)
class Run:
  """What an export needs of a finished run."""
  workdir: str
  run_info: dict[str, Any]
  model: Any  # flax module
  variables: dict[str, Any]  # numpy {'params', 'batch_stats'}
  mean: np.ndarray  # [C], of pixel / 255
  std: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.run_info['image_shape'])


def load_run(workdir: str) -> Run:
  """The finished run in `workdir`, with the normalisation its model expects."""
  variables, run_info = warm_start.restore_run(workdir, '--workdir')
  model = models.get_model(run_info['model'], run_info['num_classes'])
  mean, std = import_teacher.input_normalization(workdir, run_info)
  return Run(workdir, run_info, model, jax.tree.map(np.asarray, variables),
             mean, std)


def serving_function(run: Run) -> Callable[[jax.Array], jax.Array]:
  """uint8 [N, H, W, C] -> float32 logits [N, classes], normalising inside."""
  mean, std = (np.asarray(a, np.float32) for a in (run.mean, run.std))

  def serve(images):
    # The same float32 ops, in the same order, as preprocess.normalize.
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    return run.model.apply(run.variables, x, train=False).astype(jnp.float32)
  return serve


# ---------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------


def _require(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingConverter(f'{what} needs {module.split(".")[0]} ({e}); '
                           f'install the export extra: {INSTALL}') from None


def _spatial_max_pool(params: dict[str, Any]) -> bool:
  """A reduce_window_max over the image axes only (a max-pool)."""
  dims, strides = params['window_dimensions'], params['window_strides']
  padding = params['padding']
  return (len(dims) == 4 and dims[0] == dims[3] == strides[0] == strides[3]
          == 1 and tuple(padding[0]) == tuple(padding[3]) == (0, 0)
          and set(params['base_dilation']) == set(params['window_dilation'])
          == {1})


def _inline(jaxpr, consts: Sequence[Any], *args) -> list[Any]:
  """Evaluates `jaxpr` by binding its primitives, inlining calls, so that
  jax2onnx sees lax primitives rather than Flax functions.

  jax2onnx 0.17 replaces `flax.linen.max_pool` while it traces, by a
  function that takes no positional window and only string padding (the
  zoo's pools fail or pad wrongly), and lowers a lax max-pool over NHWC as a
  4-D ONNX MaxPool that onnxruntime cannot run; a max-pool is therefore
  rebound here as explicit -inf padding and a keyword `max_pool` over H, W.
  """
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    name, params = eqn.primitive.name, eqn.params
    if name in ('jit', 'pjit'):
      outs = _inline(params['jaxpr'].jaxpr, params['jaxpr'].consts, *values)
    elif name in ('custom_jvp_call', 'custom_vjp_call'):  # The forward.
      outs = _inline(params['call_jaxpr'].jaxpr, params['call_jaxpr'].consts,
                     *values)
    elif name == 'reduce_window_max' and _spatial_max_pool(params):
      x = jnp.pad(values[0], params['padding'], constant_values=-jnp.inf)
      outs = [nn.max_pool(x, window_shape=params['window_dimensions'][1:3],
                          strides=params['window_strides'][1:3],
                          padding='VALID')]
    else:
      outs = eqn.primitive.bind(*values, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def to_onnx(serve: Callable, image_shape: Sequence[int]) -> bytes:
  """The serialized ONNX model of `serve` (uint8 images -> logits)."""
  _require('onnx', 'ONNX export')
  jax2onnx = _require('jax2onnx', 'ONNX export')
  import logging  # pylint: disable=g-import-not-at-top
  # Its plug-ins for libraries kd_jax does not use (equinox, dm_pix) log
  # a traceback each when they do not import; onnx_ir a line per shape
  # tensor it serializes untyped.
  for name in ('jax2onnx', 'onnx_ir'):
    logging.getLogger(name).setLevel(logging.ERROR)
  (batch,) = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
  closed = jax.make_jaxpr(serve)(spec)
  proto = jax2onnx.to_onnx(
      lambda images: _inline(closed.jaxpr, closed.consts, images)[0], [spec],
      model_name='kd_jax_model', input_names=['image'],
      output_names=['logits'])
  return proto.SerializeToString()


def _litert_interpreter():
  try:
    from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
    return interpreter.Interpreter
  except ImportError:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.lite.Interpreter


def _tflite_convert(fn: Callable, image_shape: Sequence[int],
                    batch: int | None) -> bytes:
  """`fn` through jax2tf and TFLite's converter, for `batch` images (None:
  any number, jax2tf's shape polymorphism)."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  poly = None
  if batch is None:
    poly = [f'(batch, {", ".join(str(d) for d in image_shape)})']
  tf_fn = tf.function(
      jax2tf.convert(fn, polymorphic_shapes=poly, with_gradient=False),
      autograph=False, input_signature=[
          tf.TensorSpec([batch, *image_shape], tf.uint8, name='image')])
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [tf_fn.get_concrete_function()], tf_fn)
  return converter.convert()


def _resizes(blob: bytes, image_shape: Sequence[int]) -> bool:
  """Whether LiteRT runs the file on a batch of 2 after resizing its input."""
  with progress.quiet_native_imports(sys.argv):  # XNNPACK's INFO lines.
    interpreter = _litert_interpreter()(model_content=blob)
    index = interpreter.get_input_details()[0]['index']
    try:
      interpreter.resize_tensor_input(index, (2, *image_shape))
      interpreter.allocate_tensors()
      interpreter.set_tensor(index, np.zeros((2, *image_shape), np.uint8))
      interpreter.invoke()
    except (RuntimeError, ValueError):  # A reshape to a batch-1 shape.
      return False
    return interpreter.get_output_details()[0]['shape'][0] == 2


def to_tflite(serve: Callable, image_shape: Sequence[int]) -> bytes:
  """The TFLite flatbuffer of `serve` (uint8 images -> logits), from the
  first of three traces that gives a file of any batch size:

  1. at batch 1, if LiteRT resizes the file to other batches (conv nets,
     whose global pooling holds no batch-1 shape): static shapes let the
     converter fuse bias and activation into the convolutions and LiteRT
     run them in XNNPACK. The file's signature says batch 1;
     `resize_tensor_input` sets any other (`load_exported` does);
  2. batch-polymorphic (the signature's batch is -1; an MLP's flatten);
  3. the per-example function vmapped over the batch, where the converter
     refuses an op of (2) (a ViT's class-token slice is a gather of dynamic
     shape there).
  """
  try:
    with progress.quiet_native_imports(sys.argv):  # MLIR errors on refusals.
      blob = _tflite_convert(serve, image_shape, batch=1)
    if _resizes(blob, image_shape):
      return blob
  except Exception:  # pylint: disable=broad-except
    pass  # The batch-polymorphic traces below, or their error.
  try:
    with progress.quiet_native_imports(sys.argv):
      return _tflite_convert(serve, image_shape, batch=None)
  except Exception as first:  # pylint: disable=broad-except
    try:
      return _tflite_convert(
          jax.vmap(lambda image: serve(image[None])[0]), image_shape,
          batch=None)
    except Exception:  # pylint: disable=broad-except
      raise first from None


def load_exported(path: str, num_threads: int | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
  """A function uint8 images [N, H, W, C] -> logits that runs the file at
  `path` (.onnx in onnxruntime, .tflite in LiteRT) on the CPU, on
  `num_threads` threads (None: the runtime's default)."""
  if path.endswith('.onnx'):
    ort = _require('onnxruntime', 'running ONNX')
    options = ort.SessionOptions()
    if num_threads is not None:
      options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]
  if not path.endswith('.tflite'):
    raise ValueError(f'{path}: name an .onnx or a .tflite file.')
  interpreter = _litert_interpreter()(model_path=path,
                                       num_threads=num_threads)
  # Its first allocation prints an INFO line (the XNNPACK delegate) to stderr.
  with progress.quiet_native_imports(sys.argv):
    interpreter.allocate_tensors()
  (inp,), (out,) = (interpreter.get_input_details(),
                    interpreter.get_output_details())

  def run(images):
    if tuple(interpreter.get_input_details()[0]['shape']) != images.shape:
      interpreter.resize_tensor_input(inp['index'], images.shape)
      interpreter.allocate_tensors()
    interpreter.set_tensor(inp['index'], images)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out['index']))
  return run


CONVERTERS = {'onnx': to_onnx, 'tflite': to_tflite}


# ---------------------------------------------------------------------------
# Check data
# ---------------------------------------------------------------------------


def stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config, as its config.json holds it."""
  path = os.path.join(workdir, rundir.CONFIG)
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is unreadable ({e}); check with --check_split='
                     f'{RANDOM} instead of the run\'s data.') from None


def eval_images(config: ml_collections.ConfigDict, split: str,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [n, H, W, C], labels [n]) of `split` as the run's eval
  pipeline reads it (decoded, resized), before its normalisation: the
  pipeline's float images mapped back to the pixels they came from (the
  nearest pixels for imagenet2012, whose crops are resized in float)."""
  images, labels, count = [], [], 0
  for batch in input_pipeline.iterate_split(
      config, split, transfer=False, num_devices=1, process_index=0,
      process_count=1):
    mask = batch['mask']
    mean, std = input_pipeline.normalization(config.dataset,
                                             batch['image'].shape[-1])
    pixels = (batch['image'][mask] * std + mean) * 255.0
    images.append(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    labels.append(batch['label'][mask])
    count += int(mask.sum())
    if limit is not None and count >= limit:
      break
  return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def check_images(run: Run, split: str | None, count: int
                 ) -> tuple[np.ndarray, str]:
  """`count` images to check an export on, and where they come from."""
  imported = import_teacher.read_record(run.workdir) is not None
  if split == RANDOM or (split is None and imported):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (count, *run.image_shape), np.uint8),
            f'{count} random uint8 images (seed 0)')
  config = stored_config(run.workdir)
  split = split or config.eval_splits[0]
  images, _ = eval_images(config, split, count)
  if images.shape[1:] != run.image_shape:
    raise ValueError(f'split {split!r} gives images of shape '
                     f'{images.shape[1:]} but the model takes '
                     f'{run.image_shape}.')
  return images, f'{len(images)} images of split {split!r}'


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def compare(got: np.ndarray, want: np.ndarray, tolerance: float,
            what: str) -> float:
  """max |got - want|; raises ExportMismatch when it exceeds
  tolerance x max(1, max |want|), naming the largest difference."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise ExportMismatch(f'{what}: the file returns logits of shape '
                         f'{got.shape}, the JAX model {want.shape}.')
  diff = np.abs(got - want)
  bound = tolerance * max(1.0, float(np.abs(want).max()))
  worst = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
  if not worst <= bound:
    i, j = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)),
                            diff.shape)
    raise ExportMismatch(
        f'{what}: the file\'s logits differ from the JAX model\'s by up to '
        f'{worst:.3g} (image {i}, class {j}: file {got[i, j]:.7g}, JAX '
        f'{want[i, j]:.7g}), more than the tolerance {bound:.3g} (= '
        f'{tolerance:g} x max(1, max |logits| = {np.abs(want).max():.4g})); '
        f'{int((got.argmax(-1) != want.argmax(-1)).sum())} of {len(got)} '
        'predictions differ. Nothing was written.')
  return worst


def export(workdir: str, fmt: str, out: str, *,
           check_split: str | None = None, check_examples: int = 64,
           tolerance: float = DEFAULT_TOLERANCE,
           overwrite: bool = False) -> dict[str, Any]:
  """Writes the run in `workdir` as an ONNX or TFLite file at `out`.

  Args:
    workdir: a finished run (trained, or written by `kd_jax.import_teacher`).
    fmt: 'onnx' or 'tflite'.
    out: the file to write.
    check_split: the split whose images the check runs on; default the run's
      first eval split, or random images (`'random'`) for imported weights.
    check_examples: images in the check.
    tolerance: the largest difference allowed, relative to max(1, max
      |logits|).
    overwrite: replace an existing `out` (else refused).

  Returns:
    What was written and checked: path, bytes, input and output shapes,
    the check's images and max |difference|.

  Raises:
    ExportMismatch: the file's logits are not the JAX model's (nothing is
      written).
    MissingConverter: the export extra is not installed.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; choose one of {FORMATS}.')
  if not out.endswith(f'.{fmt}'):
    raise ValueError(f'--out={out!r}: name a .{fmt} file for --format={fmt}.')
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'--out={out!r} exists: pass --overwrite to '
                          'replace it, or choose another path.')
  if check_examples < 1:
    raise ValueError(f'--check_examples={check_examples}; use 1 or more.')
  run = load_run(workdir)
  serve = serving_function(run)
  images, source = check_images(run, check_split, check_examples)
  blob = CONVERTERS[fmt](serve, run.image_shape)
  tmp = f'{out}.tmp.{os.getpid()}{os.path.splitext(out)[1]}'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(tmp, 'wb') as f:
    f.write(blob)
  try:
    exported = load_exported(tmp)
    want = np.asarray(jax.jit(serve)(images))
    worst = max(compare(exported(images), want, tolerance,
                        f'{fmt} check on {source}'),
                compare(exported(images[:1]), want[:1], tolerance,
                        f'{fmt} check at batch size 1'))
  except BaseException:
    os.remove(tmp)
    raise
  os.replace(tmp, out)
  return dict(path=out, format=fmt, bytes=len(blob),
              input=['N', *run.image_shape], input_dtype='uint8',
              output=['N', run.run_info['num_classes']],
              check=source, max_abs_difference=worst,
              tolerance=tolerance * max(1.0, float(np.abs(want).max())))


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program."""
  flags.DEFINE_string('workdir', None, 'A finished run (trained or imported).')
  flags.DEFINE_enum('format', None, FORMATS, 'The file format.')
  flags.DEFINE_string('out', None, 'The file to write (.onnx or .tflite).')
  flags.DEFINE_string('check_split', None, 'Split whose images check the '
                      "export; default the run's first eval split "
                      f"('{RANDOM}': random uint8 images; the default for "
                      'imported weights).')
  flags.DEFINE_integer('check_examples', 64, 'Images in the check.')
  flags.DEFINE_float('tolerance', DEFAULT_TOLERANCE, 'Largest |logits '
                     'difference| allowed, x max(1, max |logits|).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  r = export(f.workdir, f.format, f.out, check_split=f.check_split,
             check_examples=f.check_examples, tolerance=f.tolerance,
             overwrite=f.overwrite)
  print(f'{r["path"]}: {r["format"]}, {r["bytes"] / 1e6:.3f} MB; image '
        f'uint8 {r["input"]} -> logits float32 {r["output"]}')
  print(f'checked on {r["check"]} (and at batch size 1): max |logits '
        f'difference| {r["max_abs_difference"]:.3g} <= {r["tolerance"]:.3g}')


if __name__ == '__main__':
  progress.run_quiet_cli(main, define_flags)
