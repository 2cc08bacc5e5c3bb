"""State-dict layouts of torchvision, timm and big_vision models, mapped
onto the zoo.

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
* big_vision `vit-{Ti,S,M,B,L,H}/{8,14,16,32}` (`models/vit.py`, variant
  'S/16' etc.) -> `vit` with `gelu='tanh'`, and `bit-R{26,50,101,152}x
  {1,2,3,4}` (`models/bit.py`) -> `bit`; mean = std = 0.5 (big_vision's
  `value_range(-1, 1)`). big_vision's checkpoints are flat .npz files of
  Flax params named by their tree paths joined by '/'
  (`big_vision.utils.tree_flatten_with_names`), so its layout is the zoo's
  with other module names; the file configures the ViT (`Architecture.
  configure`, `big_vision_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import ml_dtypes
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
    configure: for a format whose files say how the model is configured
      (big_vision's: which pooling, position embeddings, pre-logits), the
      file's tensors -> (the architecture they describe, the tensors under
      the names `tensors` gives). None: the file is taken as it is.
  """
  spec: Mapping[str, Any]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  head: tuple[str, ...]
  tensors: Callable[[Mapping[str, Any]], list[Tensor]]
  configure: Callable[[dict[str, np.ndarray]],
                      tuple[Architecture, dict[str, np.ndarray]]] | None = None

  def for_file(self, state: dict[str, np.ndarray]
               ) -> tuple[Architecture, dict[str, np.ndarray]]:
    """(The architecture of the file holding `state`, its tensors by the
    names of that architecture's layout)."""
    return (self, state) if self.configure is None else self.configure(state)


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
# big_vision
# ---------------------------------------------------------------------------

# width, depth, mlp_dim, num_heads of big_vision's ViT variants (Zhai et al.
# 2022, "Scaling Vision Transformers", Table 2).
BIG_VISION_VIT_VARIANTS = {
    'Ti': (192, 12, 768, 3), 'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8), 'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16), 'H': (1280, 32, 5120, 16)}
BIG_VISION_VIT_PATCHES = (8, 14, 16, 32)
# Blocks per stage of big_vision's BiT depths (`bit.get_block_desc`).
BIG_VISION_BIT_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3),
                         101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BIG_VISION_BIT_WIDTHS = (1, 2, 3, 4)
_GROUPNORMS = ('gn_root', 'gn_proj', 'gn1', 'gn2', 'gn3')
BIG_VISION_REFUSED = (
    'Refused, as no kd_jax.models network computes them: ViTs pooled by a '
    "MAP head (pool_type='map': SigLIP's image towers) or without a head; "
    "the BiT paper's pre-activation ResNetV2 (models/bit_paper.py, the "
    'original BiT-S/M checkpoints); BiT of other depths or fractional '
    'widths; mlp_mixer and the project models (models/proj/).')


def flax_leaves(name: str, module: Path, variables) -> list[Tensor]:
  """Every param of the zoo's Flax `module`, named as big_vision's .npz
  names it: `name` then the leaf's path in the module, joined by '/'."""
  out = []

  def walk(path: Path):
    node = variables['params']
    for key in path:
      node = node[key]
    for key in sorted(node):
      if hasattr(node[key], 'keys'):
        walk((*path, key))
      else:
        inner = path[len(module):]
        out.extend(param('/'.join((name, *inner, key)),
                         ('params', *path, key), variables))
  walk(module)
  return out


def _natural(name: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _linen_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pre-Linen module names -> Linen's, as Flax's `convert_pre_linen` does.

  Pre-Linen Flax numbered a module's submodules in one sequence
  ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', ...),
  Linen one sequence per class ('LayerNorm_0', ..., 'LayerNorm_1'): each
  class's submodules are renumbered 0, 1, ... in natural order. Names that
  are Linen's already stay as they are.
  """
  children: dict[Path, set[str]] = {}
  for key in state:
    parts = key.split('/')
    for depth in range(len(parts) - 1):
      children.setdefault(tuple(parts[:depth]), set()).add(parts[depth])
  renames: dict[Path, dict[str, str]] = {}
  for parent, names in children.items():
    counts: dict[str, int] = {}
    renames[parent] = {}
    for name in sorted(names, key=_natural):
      match = re.fullmatch(r'(.*)_(\d+)', name)
      if match:
        number = counts.get(match.group(1), 0)
        counts[match.group(1)] = number + 1
        renames[parent][name] = f'{match.group(1)}_{number}'
  out = {}
  for key, value in state.items():
    parts = key.split('/')
    for depth in range(len(parts) - 1):
      parts[depth] = renames[tuple(key.split('/')[:depth])].get(
          parts[depth], parts[depth])
    out['/'.join(parts)] = value
  return out


def big_vision_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A big_vision .npz's params under the names its model's params have.

  As big_vision's `utils.load_params` and `models.*.fix_old_checkpoints`
  read them: a training checkpoint's 'params/' (or an old Flax optimizer's
  'opt/target/') subtree, the rest (optimizer state) dropped; bfloat16
  arrays, which NumPy stores as 2-byte void, recovered and widened;
  pre-Linen module names renumbered (`_linen_names`); a scanned ViT's
  stacked 'Transformer/encoderblock/...' split into 'encoderblock_{i}'.
  """
  for prefix in ('params/', 'opt/target/'):
    if any(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()
               if k.startswith(prefix)}
      break
  state = {k: (v.view(ml_dtypes.bfloat16).astype(np.float32)
               if v.dtype.kind == 'V' and v.dtype.itemsize == 2 else v)
           for k, v in state.items()}
  stacked = 'Transformer/encoderblock/'
  for key in [k for k in state if k.startswith(stacked)]:
    value = state.pop(key)
    for i, block in enumerate(value):
      state[f'Transformer/encoderblock_{i}/{key[len(stacked):]}'] = block
  return _linen_names(state)


def _old_vit_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Older big_vision / vision_transformer ViT checkpoints as big_vision's
  `vit.fix_old_checkpoints` reads them: the position embedding from inside
  'Transformer' moved to the top, and one that also covers the class token
  (a square number of patches plus one) split, its first row added to
  'cls' (the same sum the old model computed in its forward pass)."""
  state = dict(state)
  for old in ('Transformer/posembed_input/pos_embedding',
              'Transformer/pos_embedding'):
    if old in state:
      state['pos_embedding'] = state.pop(old)
  posemb = state.get('pos_embedding')
  if posemb is not None and posemb.ndim == 3:
    patches = posemb.shape[1] - 1
    if patches > 0 and int(np.sqrt(patches)) ** 2 == patches:
      state['pos_embedding'] = posemb[:, 1:]
      if 'cls' in state:
        state['cls'] = (np.asarray(state['cls'], np.float32)
                        + np.asarray(posemb[:, :1], np.float32))
  return state


def big_vision_vit(variables) -> list[Tensor]:
  """big_vision ViT: embedding, pos_embedding (posemb 'learn'), cls (pool
  'tok'), Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDot
  ProductAttention_0, LayerNorm_1, MlpBlock_0/Dense_{0,1}}, Transformer/
  encoder_norm, pre_logits (rep_size), head."""
  params = variables['params']
  out = flax_leaves('embedding', ('patch_embed',), variables)
  for name, zoo in (('pos_embedding', 'pos_embed'), ('cls', 'cls_token')):
    if zoo in params:
      out += param(name, ('params', zoo), variables)
  blocks = sorted((k for k in params if re.fullmatch(r'block\d+', k)),
                  key=_number)
  for i, block in enumerate(blocks):
    prefix = f'Transformer/encoderblock_{i}'
    for name, zoo in (('LayerNorm_0', 'LayerNorm_0'),
                      ('MultiHeadDotProductAttention_0',
                       'MultiHeadDotProductAttention_0'),
                      ('LayerNorm_1', 'LayerNorm_1'),
                      ('MlpBlock_0/Dense_0', 'Dense_0'),
                      ('MlpBlock_0/Dense_1', 'Dense_1')):
      out += flax_leaves(f'{prefix}/{name}', (block, zoo), variables)
  out += flax_leaves('Transformer/encoder_norm', ('norm',), variables)
  if 'pre_logits' in params:
    out += flax_leaves('pre_logits', ('pre_logits',), variables)
  return out + flax_leaves('head', ('head',), variables)


def big_vision_bit(variables) -> list[Tensor]:
  """big_vision BiT: conv_root, gn_root, block{s}/unit{b}/{conv1..3,
  gn1..3, conv_proj, gn_proj}, head."""
  out = flax_leaves('conv_root', ('conv_root',), variables)
  out += flax_leaves('gn_root', ('gn_root',), variables)
  blocks = sorted((k for k in variables['params'] if k.startswith('stage')),
                  key=_number)
  for block in blocks:
    stage, index = _number(block)
    out += flax_leaves(f'block{stage}/unit{index}', (block,), variables)
  return out + flax_leaves('head', ('head',), variables)


def _big_vision_vit_architecture(variant: str, patch: int, pool: str = 'token',
                                 posemb: str = 'learned_patches',
                                 representation_size: int = 0
                                 ) -> Architecture:
  width, depth, mlp_dim, num_heads = BIG_VISION_VIT_VARIANTS[variant]
  spec = dict(name='vit', patch_size=patch, width=width, depth=depth,
              num_heads=num_heads, mlp_dim=mlp_dim, pool=pool, posemb=posemb,
              gelu='tanh')
  if representation_size:
    spec['representation_size'] = representation_size

  def configure(state):
    state = _old_vit_layout(big_vision_state(state))
    if any(k.startswith('MAPHead_0/') for k in state):
      raise ValueError(
          "the file's ViT pools with a MAP head (MAPHead_0: big_vision's "
          "pool_type='map'), which no kd_jax.models ViT has; importable: "
          "pool_type 'tok' (a 'cls' tensor) or 'gap' (none).")
    pre_logits = state.get('pre_logits/bias')
    return _big_vision_vit_architecture(
        variant, patch, 'token' if 'cls' in state else 'gap',
        'learned_patches' if 'pos_embedding' in state else 'sincos2d',
        int(pre_logits.shape[0]) if pre_logits is not None else 0), state

  return Architecture(spec, INCEPTION_MEAN, INCEPTION_STD,
                      ('head/bias', 'head/kernel'), big_vision_vit, configure)


def _big_vision_bit_architecture(depth: int, width: int) -> Architecture:
  def configure(state):
    state = big_vision_state(state)
    # Older Linen stored GroupNorm's scale and bias unsqueezed.
    state = {k: np.squeeze(v) if set(k.split('/')) & set(_GROUPNORMS) else v
             for k, v in state.items()}
    return bit, state

  bit = Architecture(
      {'name': 'bit', 'stage_sizes': BIG_VISION_BIT_DEPTHS[depth],
       'width': width}, INCEPTION_MEAN, INCEPTION_STD,
      ('head/bias', 'head/kernel'), big_vision_bit, configure)
  return bit


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
for _variant in BIG_VISION_VIT_VARIANTS:
  for _patch in BIG_VISION_VIT_PATCHES:
    register('big_vision', f'vit-{_variant}/{_patch}',
             _big_vision_vit_architecture(_variant, _patch))
for _depth in BIG_VISION_BIT_DEPTHS:
  for _width in BIG_VISION_BIT_WIDTHS:
    register('big_vision', f'bit-R{_depth}x{_width}',
             _big_vision_bit_architecture(_depth, _width))


def architecture(fmt: str, name: str) -> Architecture:
  """The registered architecture of `name` in `fmt` ('torchvision', 'timm',
  'big_vision'; a big_vision ViT's pooling, position embeddings and
  pre-logits come from the file: `Architecture.for_file`).

  Raises:
    ValueError: naming the architectures that `fmt` has.
  """
  if fmt == 'timm':
    name = name.split('.')[0]  # The pretrained tag picks weights, not layout.
  if (fmt, name) not in ARCHITECTURES:
    known = sorted(n for f, n in ARCHITECTURES if f == fmt)
    raise ValueError(
        f'--model={name!r} is not an importable {fmt} architecture; '
        f'{fmt} models kd_jax can hold exactly: {known}.'
        + (f' {BIG_VISION_REFUSED}' if fmt == 'big_vision' else ''))
  return ARCHITECTURES[(fmt, name)]
