"""``compiled_function`` and ``compiled_method``: how the library compiles its hot paths.

Both are ``tf.function(reduce_retracing=True, autograph=False)``. The library's code uses explicit
TensorFlow control flow (``tf.while_loop``, ``tf.cond``), so AutoGraph has nothing to convert, and
its source-to-source conversion cost about 0.9 s of the first call in a fresh process (measured on
the 2-core development machine). Keras 3's own ``fit`` does not convert user code either
(its step functions are ``do_not_convert``), so user losses and layers see the same semantics
as in training.

``tf.function`` used as a method decorator keeps only a weak reference to ``self``, so a call on
a temporary object (``InfluenceModel(model).batch_jacobian_tensor(batch)``) fails once the
object is collected mid-call. This descriptor compiles the bound method on first access and
stores it on the instance, which then keeps it (and itself) alive for as long as it is used.

TensorFlow warns about "excessive retracing" per Python function (keyed by its code object), so
the first traces of many instances (one ``InfluenceModel`` per checkpoint, a new calculator per
notebook cell) would add up to a warning although no instance retraces. The method is therefore
compiled as a per-instance ``functools.partial``, which TensorFlow keys by the object itself:
the warning then only fires for one instance tracing again and again.
"""
import functools

import tensorflow as tf


def compiled_function(function):
    """``function`` as ``tf.function(reduce_retracing=True, autograph=False)``."""
    return tf.function(function, reduce_retracing=True, autograph=False)


class compiled_method:
    """Decorate a method to run it as a :func:`compiled_function`, traced per instance."""

    def __init__(self, function):
        self.function = function
        self.name = function.__name__
        functools.update_wrapper(self, function)

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        compiled = compiled_function(functools.partial(self.function, instance))
        instance.__dict__[self.name] = compiled
        return compiled
