"""Import the cross-check packages (pytorch-fid, torch-fidelity, cd-fvd, open_clip) without
torchvision.

PyPI's torchvision is built for CUDA torch and fails to import beside the CPU torch here, so the
project never installs it (``excludes.txt``). Those packages import it at module level only; the
functions the tests compare (Fréchet statistics, I3D, CLIP towers) never call it. :func:`install`
puts a placeholder ``torchvision`` on ``sys.modules`` whose every attribute and submodule is a
class that raises when used, so a test that reaches real torchvision code fails loudly instead of
comparing against something else. It does nothing where a real torchvision imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

MESSAGE = (
    "torchvision is not installed in this environment (see excludes.txt); the code under test "
    "reached {name}, so it needs a real torchvision"
)


class _Missing(type):
    """Metaclass of the placeholders: attribute access gives another placeholder."""

    def __getattr__(cls, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(f"{cls.__qualname__}.{attr}")


def _placeholder(name: str) -> type:
    def fail(*args, **kwargs):
        raise RuntimeError(MESSAGE.format(name=name))

    return _Missing(name.rsplit(".", 1)[-1], (), {"__qualname__": name, "__new__": fail})


class _Module(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+placeholder"
        return module

    def exec_module(self, module):
        return None


def install() -> bool:
    """Make ``import torchvision`` give the placeholder; False when a real one is importable."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        return False
    sys.meta_path.insert(0, _Finder())
    return True
