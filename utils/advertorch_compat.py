"""Import advertorch 0.2.3 (its CW and DDN attacks) on current PyTorch.

advertorch 0.2.3, its last release, does `from torch.autograd.gradcheck import zero_gradients` at the
top of advertorch/attacks/fast_adaptive_boundary.py, which advertorch/__init__.py imports. PyTorch
removed that private helper long ago (it is absent from every torch>=2.4 this project supports), so
`import advertorch` fails with an ImportError although CW and DDN never call it (only advertorch's
FAB does). install_zero_gradients() puts back a replacement with the removed function's behaviour
(detach every given tensor's .grad and zero it in place) before advertorch is first imported; it
changes nothing on a PyTorch that still has the function.
"""
import collections.abc
import importlib

import torch

from utils.errors import UserError


def zero_gradients(tensors):
    """Detach and zero, in place, the .grad of a tensor or of every tensor in a (nested) iterable."""
    if isinstance(tensors, torch.Tensor):
        if tensors.grad is not None:
            tensors.grad.detach_()
            tensors.grad.zero_()
    elif isinstance(tensors, collections.abc.Iterable):
        for tensor in tensors:
            zero_gradients(tensor)


def install_zero_gradients():
    # The module itself: the name torch.autograd.gradcheck is shadowed by the gradcheck function.
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck_module, "zero_gradients"):
        gradcheck_module.zero_gradients = zero_gradients


def advertorch_attacks():
    """The advertorch.attacks module, importable on current PyTorch."""
    install_zero_gradients()
    try:
        return importlib.import_module("advertorch.attacks")
    except ImportError as error:
        raise UserError(f"the cw and ddn attacks need advertorch 0.2.3 (pip install advertorch==0.2.3): {error}") from None
