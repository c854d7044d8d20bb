"""A guard for tests: any way of reading a tensor's value on the host raises inside `no_host_reads()`."""

import contextlib

import torch


class HostRead(AssertionError):
    """A tensor was read on the host (a device sync) where the code promises not to."""


NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Make `Tensor.item`, `bool(t)`, `float(t)`, `int(t)`, indexing by a tensor scalar, `.tolist()`, `.numpy()` raise."""
    saved = {name: getattr(torch.Tensor, name) for name in NAMES}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} called: a host sync in the hot path")

        return method

    try:
        for name in NAMES:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
