"""Method registry: --method name -> keras.Model subclass whose train_step is the update rule.

A method is one module: its class, decorated with `@register("name")`, declares its settings
(a nested `Config`, from which train.py generates the flags), its sub-networks' optimizers
(`optimizer_targets`) and its update rule (`train_step`). The built-in ones are imported
below, one line each; any other registers itself when its module is imported.
"""
from __future__ import annotations

from typing import Callable

METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator: adds the method to METHODS under --method=`name`."""
    def add(cls):
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name]})")
        cls.name_in_registry = name
        METHODS[name] = cls
        return cls
    return add


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}") from None


def define_flags(define: Callable) -> list[str]:
    """Defines every registered method's settings as flags through train.py's `define`
    (kind, name, default, help, **bounds); a setting shared through the base Config once.
    Returns their names."""
    from uda_tf.methods import settings
    return settings.define_flags([cls.Config for cls in METHODS.values()], define)


from uda_tf.methods.base import SegmentationMethod  # noqa: E402
from uda_tf.methods.source_only import SourceOnly  # noqa: E402
from uda_tf.methods.grl import GRL  # noqa: E402
from uda_tf.methods.self_training import SelfTraining  # noqa: E402
from uda_tf.methods.adversarial import Adversarial  # noqa: E402
from uda_tf.methods.minent import MinEnt  # noqa: E402
from uda_tf.methods.mean_teacher import MeanTeacher  # noqa: E402
from uda_tf.methods.attent import AttENT  # noqa: E402

__all__ = ["METHODS", "register", "get_method", "define_flags", "SegmentationMethod",
           "SourceOnly", "GRL", "SelfTraining", "Adversarial", "MinEnt", "MeanTeacher",
           "AttENT"]
