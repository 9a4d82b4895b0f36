"""Method registry: --method name -> keras.Model subclass whose train_step is the update rule."""
from uda_tf.methods.adversarial import Adversarial
from uda_tf.methods.base import SegmentationMethod
from uda_tf.methods.grl import GRL
from uda_tf.methods.self_training import SelfTraining
from uda_tf.methods.minent import MinEnt
from uda_tf.methods.source_only import SourceOnly

METHODS: dict[str, type[SegmentationMethod]] = {
    "source_only": SourceOnly,
    "grl": GRL,
    "self_training": SelfTraining,
    "adversarial": Adversarial,
    "minent": MinEnt,
}


def get_method(name: str) -> type[SegmentationMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}") from None
