r"""Imports every importable architecture from the real PyTorch libraries.

  pip install -e '.[bench,import,export]' && pip install --no-deps jax2onnx==0.17.1
  python experiments/interop/verify_torch.py [--image_size=224] \
      [--formats=onnx,tflite] [--models=resnet18,deit_tiny_patch16_224]

For each torchvision and timm architecture of `kd_jax.interop.layouts.
ARCHITECTURES` (big_vision's: verify_big_vision.py), it builds
the model in torchvision or timm with random weights (the library's own
initialisation, then every BatchNorm's and LayerNorm's scale, shift and
running statistics and every bias redrawn, and zero-initialised weights
drawn, so that no tensor is a no-op whose mapping a comparison could not
see), saves its `state_dict()` as .safetensors, imports that file with
`kd_jax.import_teacher` into a fresh run directory, exports the run with
`kd_jax.export_model` (--formats) and runs the same --num_images random
uint8 images through PyTorch (normalised with the weights' mean and std, in
eval mode), the imported JAX model and each exported file. It prints, and
writes to --out, each one's largest |logits - PyTorch's logits|, also
relative to the largest |PyTorch logit| (the issue's target: 1e-3).

The PyPI torchvision wheel is built against CUDA torch; under the CPU-only
torch of some package mirrors its C++ operators (nms, roi_align) do not
register, and its import fails on their meta kernels. The models do not use
them, so this script then imports torchvision without those registrations.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import types

import jax
import numpy as np

from kd_jax import export_model
from kd_jax import import_teacher
from kd_jax.interop import layouts

HERE = os.path.dirname(os.path.abspath(__file__))


def import_torchvision():
  try:
    return importlib.import_module('torchvision')
  except RuntimeError as e:  # A CUDA torchvision wheel under CPU-only torch.
    if 'torchvision::' not in str(e):
      raise
    for name in [n for n in sys.modules if n.startswith('torchvision')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType(
        'torchvision._meta_registrations')
    return importlib.import_module('torchvision')


def build(fmt: str, name: str, num_classes: int, image_size: int, seed: int):
  """The library's model with random weights, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if fmt == 'torchvision':
    model = getattr(import_torchvision().models, name)(num_classes=num_classes)
  else:
    import timm  # pylint: disable=g-import-not-at-top
    model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                              img_size=image_size)
  g = torch.Generator().manual_seed(seed + 1)

  def draw(tensor, low=None, high=None, std=None):
    with torch.no_grad():
      if std is None:
        tensor.copy_(torch.rand(tensor.shape, generator=g) * (high - low)
                     + low)
      else:
        tensor.copy_(torch.randn(tensor.shape, generator=g) * std)

  for module in model.modules():
    if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
      draw(module.weight, 0.5, 1.5)
      draw(module.bias, std=0.1)
    if isinstance(module, torch.nn.BatchNorm2d):
      draw(module.running_mean, std=0.1)
      draw(module.running_var, 0.5, 2.0)
    elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
      if not module.weight.abs().sum():
        draw(module.weight, std=0.02)
      if module.bias is not None:
        draw(module.bias, std=0.1)
  return model.eval()


def verify(fmt: str, name: str, args, root: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  arch = layouts.architecture(fmt, name)
  model = build(fmt, name, args.num_classes, args.image_size, args.seed)
  weights = os.path.join(root, f'{name}.safetensors')
  safetensors_torch.save_file(
      {k: v.contiguous() for k, v in model.state_dict().items()}, weights)
  workdir = os.path.join(root, name)
  start = time.time()
  import_teacher.import_weights(fmt, name, weights, workdir,
                                image_size=args.image_size)
  pixels = np.random.default_rng(args.seed).integers(
      0, 256, (args.num_images, args.image_size, args.image_size, 3),
      np.uint8)
  mean, std = (np.asarray(v, np.float32) for v in (arch.mean, arch.std))
  normalised = ((pixels.astype(np.float32) / 255.0 - mean) / std)
  with torch.no_grad():
    want = model(torch.from_numpy(normalised.transpose(0, 3, 1, 2))).numpy()
  run = export_model.load_run(workdir)
  got = {'jax': np.asarray(jax.jit(export_model.serving_function(run))(
      pixels))}
  for out_format in args.formats:
    path = os.path.join(root, f'{name}.{out_format}')
    export_model.export(workdir, out_format, path,
                        check_examples=args.check_examples)
    got[out_format] = export_model.load_exported(path)(pixels)
  scale = float(np.abs(want).max())
  row = dict(format=fmt, model=name, spec=arch.spec,
             max_abs_torch_logit=scale, seconds=time.time() - start)
  for key, logits in got.items():
    diff = float(np.abs(logits - want).max())
    row[key] = dict(max_abs_difference=diff, relative=diff / scale,
                    same_argmax=int((logits.argmax(-1)
                                     == want.argmax(-1)).sum()))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_images', type=int, default=4)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--check_examples', type=int, default=8,
                      help="export_model's own check, on random images")
  parser.add_argument('--formats', default='onnx',
                      help='comma-separated export formats (onnx, tflite)')
  parser.add_argument('--models', default='',
                      help='comma-separated model names (default: all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=os.path.join(HERE, 'results.json'))
  args = parser.parse_args()
  args.formats = [f for f in args.formats.split(',') if f]
  wanted = set(filter(None, args.models.split(',')))
  import torch  # pylint: disable=g-import-not-at-top
  torchvision = import_torchvision()  # Before timm, which imports it.
  import timm  # pylint: disable=g-import-not-at-top
  versions = dict(torch=torch.__version__, torchvision=torchvision.__version__,
                  timm=timm.__version__, jax=jax.__version__)
  print(' '.join(f'{k} {v}' for k, v in versions.items()))
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for fmt, name in layouts.ARCHITECTURES:
      if fmt not in ('torchvision', 'timm') or (wanted and name not in
                                                 wanted):
        continue
      row = verify(fmt, name, args, root)
      rows.append(row)
      print(f'{fmt:11s} {name:34s} max|torch logit| '
            f'{row["max_abs_torch_logit"]:8.3f}  ' + '  '.join(
                f'{k} {row[k]["max_abs_difference"]:.2e} '
                f'({row[k]["relative"]:.1e} rel, argmax '
                f'{row[k]["same_argmax"]}/{args.num_images})'
                for k in ('jax', *args.formats)) +
            f'  {row["seconds"]:.0f} s', flush=True)
  with open(args.out, 'w') as f:
    json.dump(dict(versions=versions, image_size=args.image_size,
                   num_images=args.num_images,
                   num_classes=args.num_classes, rows=rows), f, indent=2)
  worst = max(row[k]['relative'] for row in rows
              for k in ('jax', *args.formats))
  print(f'largest relative difference {worst:.1e} (target 1e-3)')
  return 0 if worst <= 1e-3 else 1


if __name__ == '__main__':
  sys.exit(main())
