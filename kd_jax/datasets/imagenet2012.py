"""`imagenet2012`: TFDS's ILSVRC-2012, from its manual download.

Its JPEGs stay encoded through the shuffle and are decoded per example after
it (an Inception crop for `augment='imagenet'`, else a center crop), at
224x224 unless `config.image_size` says otherwise.
"""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name='imagenet2012',
    normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    image_size=(224, 224), large=True,
    manual=('Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            'from image-net.org into <data_dir>/downloads/manual/, then run '
            '`tfds build imagenet2012 --data_dir=<data_dir>` and set '
            'config.data_dir to <data_dir>.')))
