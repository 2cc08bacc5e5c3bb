"""Other libraries' models in and out of kd_jax.

* `layouts`: how a torchvision / timm / big_vision state dict's tensors
  (names, shapes, memory layouts) map onto the variables of a
  `kd_jax.models` network, one registered architecture per (format, model
  name).

The command-line tools are `kd_jax.import_teacher` (state dict -> run
directory) and `kd_jax.export_model` (run -> ONNX / TFLite file).
"""
