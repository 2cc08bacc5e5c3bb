"""Named records of one kind, each defined and registered in its own module.

big_vision finds a model or a preprocessing op by the name in its config;
here a registry does the same for distillation methods
(`kd_jax.methods.logit`, `kd_jax.methods.feature`), teacher sources
(`kd_jax.teachers.sources`) and datasets (`kd_jax.datasets`). A registry
belongs to a package (`kd_jax.methods.logit`); its record `name` lives in
the module `<package>.<name>`, which calls `registry.register(record)` at
import.
`get(name, field)` imports that module on first use, so nothing imports a
method it does not run, and adding one is adding its module. Records defined
elsewhere (a project's own method, a source that lives beside its feature)
register the same way, once their module is imported.

Example:
  >>> from kd_jax.methods import logit
  >>> logit.LOGIT_METHODS.get('dkd', 'config.distill.soft').name
  'dkd'
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Generic, TypeVar

Record = TypeVar('Record')


class Registry(Generic[Record]):
  """Records of one kind by name; see the module docstring.

  Attributes:
    package: the package whose modules are the built-in records.
    kind: what a record is, in words, for error messages ('soft loss').
    records: {name: record} of those registered so far.
  """

  def __init__(self, package: str, kind: str):
    self.package = package
    self.kind = kind
    self.records: dict[str, Record] = {}

  def register(self, record: Record) -> Record:
    """Adds `record` under `record.name`; another record of that name is
    refused."""
    name = getattr(record, 'name')
    if name in self.records and self.records[name] is not record:
      raise ValueError(f'a {self.kind} named {name!r} is registered twice '
                       f'(in {self.records[name]!r} and {record!r}).')
    self.records[name] = record
    return record

  def _modules(self) -> set[str]:
    package = importlib.import_module(self.package)
    return {m.name for m in pkgutil.iter_modules(package.__path__)
            if not m.name.startswith('_')}

  def names(self) -> tuple[str, ...]:
    """Every record's name, the package's modules imported first."""
    for module in self._modules():
      importlib.import_module(f'{self.package}.{module}')
    return tuple(sorted(self.records))

  def get(self, name: Any, field: str) -> Record:
    """The record `name`, importing its module if needed.

    Raises:
      ValueError: naming `field`, the value, the known names and the
        closest one.
    """
    if isinstance(name, str) and name not in self.records and (
        name in self._modules()):
      importlib.import_module(f'{self.package}.{name}')
    if not isinstance(name, str) or name not in self.records:
      known = self.names()
      close = difflib.get_close_matches(str(name), known, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ValueError(f'{field}={name!r} names no {self.kind}{hint}; choose '
                       f'one of {known}.')
    return self.records[name]
