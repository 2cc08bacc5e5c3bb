"""Distillation methods: one module each, registered where it is defined.

* `kd_jax.methods.logit`: the soft term (`config.distill.soft`), one module
  per loss (`kl`, `soft_ce`, `logit_mse`, `dkd`, `dist`, `deit_hard`).
* `kd_jax.methods.ctkd`: CTKD's learned temperature (`config.distill.ctkd`).
* `kd_jax.methods.registry`: the `Registry` every kind of method shares.

A method is found by its name, which is its module's: the core imports no
method, and a new one is a new module (README, "Adding a method").
"""
