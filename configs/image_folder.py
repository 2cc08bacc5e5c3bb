r"""Your own images in class folders: a ResNet-18 teacher -> a 3-layer CNN.

The layout is root/{train,val,test}/<class>/*.png|jpg, e.g. chest X-rays in
NORMAL/ and PNEUMONIA/. Images are resized to 224x224 and kept RGB; the class
names come from the folder names.

  python -m kd_jax.main --config=configs/image_folder.py:role=teacher,image_folder=DIR \
      --workdir=workdirs/xray_resnet18
  python -m kd_jax.main \
      --config=configs/image_folder.py:role=distill,image_folder=DIR,teacher_workdir=workdirs/xray_resnet18 \
      --workdir=workdirs/xray_cnn_kd

The CNN has about 277k parameters at 224x224 and 2 classes (ResNet-18:
11.2M); experiments/size_speed/README.md measures their size and CPU latency.

Starting from a pretrained ResNet-18 (the usual way: a torchvision state
dict you already have, imported once), the teacher is fine-tuned from it
(`init_from`: every tensor but the 1000-class head, which starts afresh for
your classes) and then distilled at the alpha and T of your choice:

  python -m kd_jax.import_teacher --format=torchvision --model=resnet18 \
      --weights=resnet18.safetensors --workdir=workdirs/resnet18_imagenet
  python -m kd_jax.main \
      --config=configs/image_folder.py:role=teacher,image_folder=DIR,init_from=workdirs/resnet18_imagenet \
      --workdir=workdirs/xray_resnet18
  python -m kd_jax.main \
      --config=configs/image_folder.py:role=distill,image_folder=DIR,teacher_workdir=workdirs/xray_resnet18,distill.alpha=0.5,distill.temperature=6.0 \
      --workdir=workdirs/xray_cnn_kd
  python -m kd_jax.export_model --workdir=workdirs/xray_cnn_kd \
      --format=onnx --out=xray_cnn.onnx

tests/test_import_teacher.py runs the first three on a generated folder
(tests/test_export_model.py the export).
"""

from kd_jax import config_lib

TEACHER = config_lib.model_config('resnet18')
STUDENT = config_lib.model_config('cnn')


def get_config(arg=None):
  c = config_lib.default_config()
  c.role = 'distill'
  c.teacher_workdir = 'workdirs/image_folder_resnet18'
  c.dataset = 'image_folder'
  c.eval_splits = ('val', 'test')
  c.image_size = (224, 224)
  c.channels = 3
  c.augment = 'imagenet'
  c.batch_size = 32
  c.eval_batch_size = 64
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.schedule = 'cosine'
  c.num_epochs = 20
  c.distill.temperature = 4.0
  c.distill.alpha = 0.7
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  return config_lib.apply_role(c, TEACHER, STUDENT)


def _runlocal(c):
  config_lib.shrink_for_runlocal(c)
  c.image_size = (32, 32)
