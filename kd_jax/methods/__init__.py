"""Distillation methods: one module each, registered where it is defined.

* `kd_jax.methods.logit`: the soft term (`config.distill.soft`), one module
  per loss (`kl`, `soft_ce`, `logit_mse`, `dkd`, `dist`, `deit_hard`).
* `kd_jax.methods.feature`: feature terms (`config.distill.features`), one
  module per method (`fitnet`, `at`, `sp`, `cc`, `vid`, `rkd`, `pkt`, `crd`).
* `kd_jax.methods.ctkd`: CTKD's learned temperature (`config.distill.ctkd`).

A method is found by its name, which is its module's (`kd_jax.registry`):
the core imports no method, and a new one is a new module (README, "Adding
a method").
"""
