"""Exceptions raised on bad input; each subclasses the built-in a user would catch."""


class SingularHessianError(ValueError):
    """The (damped) Hessian cannot be inverted as asked: it is singular or not positive definite.

    Raised by the iterative solvers when they meet a direction of zero or negative curvature.
    The fix is a positive ``damping`` (solve ``(H + damping·I) x = v`` instead) or the
    pseudo-inverse of :class:`~influence_lib.ExactIHVP`.
    """


class NonFiniteError(FloatingPointError):
    """A gradient, Hessian or influence value is NaN or infinite."""
