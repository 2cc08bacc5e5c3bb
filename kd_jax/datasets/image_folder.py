"""`image_folder`: your images in class folders,
`config.image_folder/{train,val,test}/<class>/*.png|jpg|jpeg`
(`kd_jax.data.sources.FolderSource`); pixels are mapped to [-1, 1]."""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name=sources.IMAGE_FOLDER, normalization=((0.5,), (0.5,)),
    read=sources.FolderSource))
