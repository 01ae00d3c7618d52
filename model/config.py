"""What every model family shares: its config base, its size registry, its files on disk.

- :class:`ModelConfig` — frozen dataclass configs (DiT, VAE, flow schedule) that round-trip
  through dicts and JSON; an unknown key is an error naming the allowed ones.
- :class:`SizeRegistry` — the named sizes of one family; an unknown name raises
  :class:`UnknownSizeError` listing the known ones.
- :class:`Pretrained` — ``save_pretrained(directory)`` / ``from_pretrained(directory, device,
  **overrides)``: ``config.json`` + ``model.safetensors``, the same for every model.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class UnknownSizeError(ValueError):
    """A size name that is not in its family's registry."""


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of the model configs: dict / JSON round trip, unknown keys refused.

    JSON has no tuples, so lists given for tuple-typed fields are stored as tuples: the config
    stays hashable and compares equal to the one that was saved.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and _admits_tuple(hints[f.name]):
                object.__setattr__(self, f.name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s) {unknown}; allowed keys are {sorted(known)}"
            )
        return cls(**data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _admits_tuple(tp: Any) -> bool:
    """Whether a field annotation is ``tuple[...]`` or an optional one."""
    if typing.get_origin(tp) is tuple or tp is tuple:
        return True
    return any(_admits_tuple(arg) for arg in typing.get_args(tp) if arg is not type(None))


# --------------------------------------------------------------------------- sizes

C = TypeVar("C", bound=ModelConfig)


class SizeRegistry(Mapping[str, C], Generic[C]):
    """Named sizes of one model family; ``config(name, **overrides)`` builds one."""

    def __init__(self, family: str, sizes: dict[str, C]):
        self.family = family
        self._sizes = dict(sizes)

    def __getitem__(self, name: str) -> C:
        if name not in self._sizes:
            raise UnknownSizeError(
                f"unknown {self.family} size {name!r}; choose one of {sorted(self._sizes)}"
            )
        return self._sizes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def config(self, name: str, **overrides: Any) -> C:
        """The config of size ``name`` with ``overrides`` replacing fields (validated again)."""
        base = self[name]
        return type(base).from_dict({**base.to_dict(), **overrides})


# --------------------------------------------------------------------------- files


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from ``config``.

    Subclasses set :attr:`config_class` and take the config as their only constructor argument.
    """

    config_class: ClassVar[type[ModelConfig]]
    config: ModelConfig

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.config.to_json(directory / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "model": type(self).__name__}
        save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: Any = "cpu", **overrides: Any) -> Self:
        """Load what :meth:`save_pretrained` wrote; ``overrides`` replace config keys that do
        not change the weights (e.g. the DiT's ``attention_backend``). Missing files,
        unknown config keys and mismatched weights raise, naming what is wrong."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} is missing: {cls.__name__}.from_pretrained needs "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by save_pretrained"
                )
        data = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(cls.config_class.from_dict({**data, **overrides}))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights in {directory} do not match its {CONFIG_NAME}: missing {missing}, "
                f"unexpected {unexpected}"
            )
        return model.to(device)
