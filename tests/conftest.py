"""Shared test set-up: 8 simulated CPU devices, so every test runs data-parallel,
and a private TFDS data_dir per test worker, so tests never touch
~/tensorflow_datasets and parallel workers never race on it."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix='kd_jax_tfds_')
