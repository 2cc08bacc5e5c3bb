"""Model zoo: Flax linen classifiers built from a config spec.

Every model is called as `model.apply(variables, images, train, rngs=...)`
with float images [B, H, W, C] and returns float32 logits [B, num_classes].
BatchNorm statistics live in the 'batch_stats' collection (pass
`mutable=['batch_stats']` when `train=True`); dropout draws from the
'dropout' rng stream when `train=True`. Named intermediate features come out
of `kd_jax.models.features.apply_with_features` (names listed there).
The language models (`decoder*`, `kd_jax.models.decoder`) take int token
ids [B, L] instead and return logits [B, L, V]; for them `get_model`'s
`num_classes` is the vocabulary size.

The CIFAR models are the definitions of RepDistiller (Tian et al. 2020, the
CRD benchmark), `mobilenetv1` that of the ImageNet ResNet-50 -> MobileNetV1
row, the ViTs timm's / DeiT's (with options for big_vision's), `bit*`
big_vision's GroupNorm ResNets; each factory's docstring gives its
parameter count, which equals the reference's.
"""

from collections.abc import Callable, Mapping
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import bit
from kd_jax.models import decoder
from kd_jax.models import mobilenet
from kd_jax.models import resnet
from kd_jax.models import shufflenet
from kd_jax.models import vgg
from kd_jax.models import vit
from kd_jax.models.cnn import CNN
from kd_jax.models.mlp import MLP
from kd_jax.models.resnet import ResNet
from kd_jax.models.resnet import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    'mlp': MLP,
    'cnn': CNN,
    'resnet18': resnet.resnet18,
    'resnet34': resnet.resnet34,
    'resnet50': resnet.resnet50,
    'resnet8': resnet.resnet8,
    'resnet14': resnet.resnet14,
    'resnet20': resnet.resnet20,
    'resnet32': resnet.resnet32,
    'resnet44': resnet.resnet44,
    'resnet56': resnet.resnet56,
    'resnet110': resnet.resnet110,
    'resnet8x4': resnet.resnet8x4,
    'resnet32x4': resnet.resnet32x4,
    'resnet50_cifar': resnet.resnet50_cifar,
    'wrn': WideResNet,
    'wrn_16_1': resnet.wrn_16_1,
    'wrn_16_2': resnet.wrn_16_2,
    'wrn_40_1': resnet.wrn_40_1,
    'wrn_40_2': resnet.wrn_40_2,
    'vgg8': vgg.vgg8,
    'vgg11': vgg.vgg11,
    'vgg13': vgg.vgg13,
    'vgg16': vgg.vgg16,
    'vgg19': vgg.vgg19,
    'mobilenetv2': mobilenet.mobilenetv2,
    'shufflenetv1': shufflenet.shufflenetv1,
    'shufflenetv2': shufflenet.shufflenetv2,
    'mobilenetv1': mobilenet.mobilenetv1,
    'vit': vit.ViT,
    'vit_ti16': vit.vit_ti16,
    'vit_s16': vit.vit_s16,
    'vit_mini': vit.vit_mini,
    'vit_tiny': vit.vit_tiny,
    'bit': bit.BiT,
    'bit_r50x1': bit.bit_r50x1,
    'decoder': decoder.decoder,
    'decoder_tiny': decoder.decoder_tiny,
    'decoder_small': decoder.decoder_small,
    'decoder_base': decoder.decoder_base,
}

# Arguments that get_model supplies itself, or that are Flax internals.
_RESERVED_ARGS = frozenset({'num_classes', 'dtype', 'parent', 'name'})


def model_kwargs(name: str) -> tuple[str, ...]:
  """The spec fields (besides `name`) that model `name` accepts."""
  parameters = inspect.signature(MODELS[name]).parameters
  return tuple(p for p in parameters if p not in _RESERVED_ARGS)


def get_model(spec: Mapping[str, Any], num_classes: int,
              dtype: Any = jnp.float32) -> nn.Module:
  """Builds the classifier a model spec names.

  Args:
    spec: ConfigDict or dict with `name` (a key of `MODELS`) and the model's
      constructor kwargs, e.g. `{'name': 'mlp', 'hidden': (1200, 1200),
      'dropout': 0.5}`.
    num_classes: number of logits.
    dtype: computation dtype (e.g. jnp.bfloat16); params are float32 and the
      logits are cast to float32.

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: for an unknown model name or a kwarg the model does not take.

  >>> model = get_model({'name': 'mlp', 'hidden': (30, 30)}, num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> param_count(variables['params'])  # 784*30+30 + 30*30+30 + 30*10+10
  24790
  """
  kwargs = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  name = kwargs.pop('name', None)
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r}; set config.model.name to '
                     f'one of {sorted(MODELS)}.')
  accepted = model_kwargs(name)
  for key in kwargs:
    if key not in accepted:
      raise ValueError(f'Model {name!r} does not accept config.model.{key}; '
                       f'its kwargs are {list(accepted)}.')
  # ConfigDicts hold lists; Flax module attributes should be hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in kwargs.items()}
  return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)


def param_count(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def param_bytes(params: Any) -> int:
  """Bytes taken by a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(params))
