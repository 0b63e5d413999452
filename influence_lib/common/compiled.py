"""``compiled_method``: a ``tf.function`` per instance, owned by the instance.

``tf.function`` used as a method decorator keeps only a weak reference to ``self``, so a call on
a temporary object (``InfluenceModel(model).batch_jacobian_tensor(batch)``) fails once the
object is collected mid-call. This descriptor compiles the bound method on first access and
stores it on the instance, which then keeps it (and itself) alive for as long as it is used.
"""
import functools

import tensorflow as tf


class compiled_method:
    """Decorate a method to run it as ``tf.function(reduce_retracing=True)``, traced per instance."""

    def __init__(self, function):
        self.function = function
        self.name = function.__name__
        functools.update_wrapper(self, function)

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        compiled = tf.function(self.function.__get__(instance, owner), reduce_retracing=True)
        instance.__dict__[self.name] = compiled
        return compiled
