"""Facts about the current run that the host passes in with each invocation."""

_attempt = 1


def attempt():
    """The number of the current attempt of this task: 1 for the first, 2 for the first retry.

    Under plain Python (outside Capsule) it is always 1.
    """
    return _attempt
