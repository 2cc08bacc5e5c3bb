"""State-dict layouts of torchvision and timm models, mapped onto the zoo.

An `Architecture` names the `kd_jax.models` spec that computes the same
function as a library's model, the input normalisation its published
weights expect, and, from the zoo model's variables (shapes only), the
`Tensor`s of the library's state dict: each tensor's name and shape there
and how its values fill zoo leaves. Shapes there are derived from the zoo's,
so a file whose tensors have other shapes is another architecture.

Layout conventions (PyTorch -> Flax): a conv weight [out, in / groups, kh,
kw] -> kernel [kh, kw, in / groups, out]; a linear weight [out, in] ->
kernel [in, out]; BatchNorm weight, bias, running_mean, running_var ->
params scale, bias and batch_stats mean, var (`num_batches_tracked` is
training state, read and dropped); LayerNorm weight, bias -> scale, bias;
timm's fused attention `qkv` [3 x heads x head_dim, width] -> Flax's
query/key/value kernels [width, heads, head_dim], its `proj` -> `out`
[heads, head_dim, width].

Registered (`ARCHITECTURES`, by (format, model name)):
* torchvision `resnet18`, `resnet34`, `resnet50` -> the zoo's, whose layout
  is torchvision's (stride in the bottleneck's 3x3 conv, v1.5);
  `mobilenet_v2` -> `mobilenetv2` with `layout='torchvision'`; ImageNet
  mean and std;
* timm `vit_tiny_patch16_224`, `vit_small_patch16_224` (mean = std = 0.5)
  and `deit_{tiny,small}_patch16_224`, `deit_{tiny,small}_distilled_
  patch16_224` (ImageNet mean and std) -> `vit_ti16` / `vit_s16` (with the
  distillation token for the distilled DeiTs). A timm name's pretrained tag
  (`vit_tiny_patch16_224.augreg_in21k_ft_in1k`) is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import numpy as np

Path = tuple[str, ...]  # ('params', 'stem_conv', 'kernel')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
# Training state of torch's BatchNorm: in every state dict, read by no one.
IGNORED_SUFFIXES = ('.num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of a foreign state dict and the zoo leaves it fills."""
  name: str
  shape: tuple[int, ...]
  fill: Callable[[np.ndarray], dict[Path, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A library's model as a zoo spec, and its state dict's layout.

  Attributes:
    spec: the `kd_jax.models` spec computing the same function.
    mean, std: the per-channel normalisation of pixel / 255 that the
      library's published weights expect.
    head: names of the classifier's tensors, whose first axis counts the
      classes (replaced when the run has another number of classes).
    tensors: zoo variables (arrays or ShapeDtypeStructs) -> the state dict's
      tensors.
  """
  spec: Mapping[str, Any]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  head: tuple[str, ...]
  tensors: Callable[[Mapping[str, Any]], list[Tensor]]


def _shape(variables, path: Path) -> tuple[int, ...]:
  node = variables
  for key in path:
    node = node[key]
  return tuple(node.shape)


def _has(variables, path: Path) -> bool:
  node = variables
  for key in path:
    if not hasattr(node, 'keys') or key not in node:
      return False
    node = node[key]
  return True


def _number(name: str) -> tuple[int, ...]:
  """Sort key: the integers in a module name ('stage2_block10' -> (2, 10))."""
  return tuple(int(n) for n in re.findall(r'\d+', name))


def param(name: str, path: Path, variables) -> list[Tensor]:
  """A tensor stored as the zoo stores it (tokens, position embeddings)."""
  return [Tensor(name, _shape(variables, path), lambda a: {path: a})]


def conv(name: str, module: Path, variables) -> list[Tensor]:
  """torch Conv2d -> nn.Conv: [out, in/g, kh, kw] -> [kh, kw, in/g, out]."""
  kernel = ('params', *module, 'kernel')
  kh, kw, cin, cout = _shape(variables, kernel)
  out = [Tensor(f'{name}.weight', (cout, cin, kh, kw),
                lambda w: {kernel: w.transpose(2, 3, 1, 0)})]
  if _has(variables, ('params', *module, 'bias')):
    out += param(f'{name}.bias', ('params', *module, 'bias'), variables)
  return out


def dense(name: str, module: Path, variables) -> list[Tensor]:
  """torch Linear -> nn.Dense (weight [out, in] -> kernel [in, out])."""
  kernel = ('params', *module, 'kernel')
  fan_in, fan_out = _shape(variables, kernel)
  return [Tensor(f'{name}.weight', (fan_out, fan_in), lambda w: {kernel: w.T}),
          *param(f'{name}.bias', ('params', *module, 'bias'), variables)]


def batchnorm(name: str, module: Path, variables) -> list[Tensor]:
  """torch BatchNorm2d -> nn.BatchNorm (params and batch_stats)."""
  return [*param(f'{name}.weight', ('params', *module, 'scale'), variables),
          *param(f'{name}.bias', ('params', *module, 'bias'), variables),
          *param(f'{name}.running_mean', ('batch_stats', *module, 'mean'),
                 variables),
          *param(f'{name}.running_var', ('batch_stats', *module, 'var'),
                 variables)]


def layernorm(name: str, module: Path, variables) -> list[Tensor]:
  return [*param(f'{name}.weight', ('params', *module, 'scale'), variables),
          *param(f'{name}.bias', ('params', *module, 'bias'), variables)]


def fused_attention(name: str, module: Path, variables) -> list[Tensor]:
  """timm Attention (qkv, proj) -> nn.MultiHeadDotProductAttention."""
  prefix = ('params', *module)
  width, heads, head_dim = _shape(variables, (*prefix, 'query', 'kernel'))
  parts = ('query', 'key', 'value')

  def qkv_weight(w):  # [3 * heads * head_dim, width], q rows first.
    w = w.reshape(3, heads, head_dim, width).transpose(0, 3, 1, 2)
    return {(*prefix, p, 'kernel'): w[i] for i, p in enumerate(parts)}

  def qkv_bias(b):
    b = b.reshape(3, heads, head_dim)
    return {(*prefix, p, 'bias'): b[i] for i, p in enumerate(parts)}

  out_kernel = (*prefix, 'out', 'kernel')
  return [
      Tensor(f'{name}.qkv.weight', (3 * heads * head_dim, width), qkv_weight),
      Tensor(f'{name}.qkv.bias', (3 * heads * head_dim,), qkv_bias),
      Tensor(f'{name}.proj.weight', (width, heads * head_dim),
             lambda w: {out_kernel: w.T.reshape(heads, head_dim, width)}),
      *param(f'{name}.proj.bias', (*prefix, 'out', 'bias'), variables)]


# ---------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------


def torchvision_resnet(variables) -> list[Tensor]:
  """torchvision.models.ResNet: conv1, bn1, layer{s}.{b}.conv{i}/bn{i}
  (/downsample.0, .1), fc."""
  out = conv('conv1', ('stem_conv',), variables)
  out += batchnorm('bn1', ('stem_bn',), variables)
  blocks = sorted((k for k in variables['params'] if k.startswith('stage')),
                  key=_number)
  for block in blocks:
    stage, index = _number(block)
    prefix = f'layer{stage}.{index - 1}'
    for sub in sorted(variables['params'][block]):
      if sub.startswith('Conv_'):
        out += conv(f'{prefix}.conv{_number(sub)[0] + 1}', (block, sub),
                    variables)
      elif sub.startswith('BatchNorm_'):
        out += batchnorm(f'{prefix}.bn{_number(sub)[0] + 1}', (block, sub),
                         variables)
      elif sub == 'proj_conv':
        out += conv(f'{prefix}.downsample.0', (block, sub), variables)
      elif sub == 'proj_bn':
        out += batchnorm(f'{prefix}.downsample.1', (block, sub), variables)
  return out + dense('fc', ('head',), variables)


def torchvision_mobilenet_v2(variables) -> list[Tensor]:
  """torchvision.models.MobileNetV2: features.0 (stem), features.1..17
  (inverted residuals: conv.0 expand, conv.1 depthwise, conv.2 project,
  conv.3 its BN; without the expansion at t=1, conv.0 depthwise, conv.1
  project, conv.2 BN), features.18 (last conv), classifier.1."""
  out = conv('features.0.0', ('stem_conv',), variables)
  out += batchnorm('features.0.1', ('stem_bn',), variables)
  blocks = sorted((k for k in variables['params'] if k.startswith('group')),
                  key=_number)
  for i, block in enumerate(blocks, start=1):
    subs = variables['params'][block]
    convs = sum(s.startswith('Conv_') for s in subs)
    names = ([('conv.0.0', 'conv.0.1'), ('conv.1.0', 'conv.1.1'),
              ('conv.2', 'conv.3')] if convs == 3 else
             [('conv.0.0', 'conv.0.1'), ('conv.1', 'conv.2')])
    for j, (conv_name, bn_name) in enumerate(names):
      out += conv(f'features.{i}.{conv_name}', (block, f'Conv_{j}'),
                  variables)
      out += batchnorm(f'features.{i}.{bn_name}', (block, f'BatchNorm_{j}'),
                       variables)
  last = len(blocks) + 1
  out += conv(f'features.{last}.0', ('last_conv',), variables)
  out += batchnorm(f'features.{last}.1', ('last_bn',), variables)
  return out + dense('classifier.1', ('head',), variables)


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------


def timm_vit(variables) -> list[Tensor]:
  """timm VisionTransformer / VisionTransformerDistilled: patch_embed.proj,
  cls_token (, dist_token), pos_embed, blocks.{i}.{norm1, attn, norm2,
  mlp.fc1, mlp.fc2}, norm, head (, head_dist)."""
  params = variables['params']
  out = conv('patch_embed.proj', ('patch_embed',), variables)
  for token in ('cls_token', 'dist_token', 'pos_embed'):
    if token in params:
      out += param(token, ('params', token), variables)
  blocks = sorted((k for k in params if re.fullmatch(r'block\d+', k)),
                  key=_number)
  for i, block in enumerate(blocks):
    prefix = f'blocks.{i}'
    out += layernorm(f'{prefix}.norm1', (block, 'LayerNorm_0'), variables)
    out += fused_attention(f'{prefix}.attn',
                           (block, 'MultiHeadDotProductAttention_0'),
                           variables)
    out += layernorm(f'{prefix}.norm2', (block, 'LayerNorm_1'), variables)
    out += dense(f'{prefix}.mlp.fc1', (block, 'Dense_0'), variables)
    out += dense(f'{prefix}.mlp.fc2', (block, 'Dense_1'), variables)
  out += layernorm('norm', ('norm',), variables)
  out += dense('head', ('head',), variables)
  if 'head_dist' in params:
    out += dense('head_dist', ('head_dist',), variables)
  return out


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

ARCHITECTURES: dict[tuple[str, str], Architecture] = {}


def register(fmt: str, name: str, architecture: Architecture) -> None:
  ARCHITECTURES[(fmt, name)] = architecture


for _depth in (18, 34, 50):
  register('torchvision', f'resnet{_depth}', Architecture(
      {'name': f'resnet{_depth}'}, IMAGENET_MEAN, IMAGENET_STD,
      ('fc.weight', 'fc.bias'), torchvision_resnet))
register('torchvision', 'mobilenet_v2', Architecture(
    {'name': 'mobilenetv2', 'layout': 'torchvision'}, IMAGENET_MEAN,
    IMAGENET_STD, ('classifier.1.weight', 'classifier.1.bias'),
    torchvision_mobilenet_v2))
for _size, _zoo in (('tiny', 'vit_ti16'), ('small', 'vit_s16')):
  register('timm', f'vit_{_size}_patch16_224', Architecture(
      {'name': _zoo}, INCEPTION_MEAN, INCEPTION_STD,
      ('head.weight', 'head.bias'), timm_vit))
  register('timm', f'deit_{_size}_patch16_224', Architecture(
      {'name': _zoo}, IMAGENET_MEAN, IMAGENET_STD,
      ('head.weight', 'head.bias'), timm_vit))
  register('timm', f'deit_{_size}_distilled_patch16_224', Architecture(
      {'name': _zoo, 'distill_token': True}, IMAGENET_MEAN, IMAGENET_STD,
      ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'),
      timm_vit))


def architecture(fmt: str, name: str) -> Architecture:
  """The registered architecture of `name` in `fmt` ('torchvision', 'timm').

  Raises:
    ValueError: naming the architectures that `fmt` has.
  """
  if fmt == 'timm':
    name = name.split('.')[0]  # The pretrained tag picks weights, not layout.
  if (fmt, name) not in ARCHITECTURES:
    known = sorted(n for f, n in ARCHITECTURES if f == fmt)
    raise ValueError(
        f'--model={name!r} is not an importable {fmt} architecture; '
        f'{fmt} models kd_jax can hold exactly: {known}.')
  return ARCHITECTURES[(fmt, name)]
