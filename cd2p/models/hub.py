"""Hugging Face Hub integration shared by every cd2p model: strict loading, ``config.json``
with the model kind, and model cards (whose content lives in :mod:`cd2p.cards`)."""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_model

from cd2p._atomic import atomic_output, atomic_write_json
from cd2p._reading import reading
from cd2p._resources import hubcard_path
from cd2p.cards import card_context, card_metadata

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def check_local_path(name: str | Path, what: str = "model") -> None:
    """Fail at once when ``name`` looks like a local path but no such directory exists.

    Local-looking: it starts with ``.``, ``/`` or ``~``, holds a backslash or more than one
    ``/`` (a Hub id is ``org/name``), ends with ``/``, or its first part is a local directory
    (``runs/x`` where ``runs/`` exists). Without this, huggingface_hub would try such a name as
    a Hub id, retry for half a minute and blame the connection.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what} {text}: not a directory (expected a saved model)")
        return
    first = text.split("/", 1)[0]
    local = (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or (text.count("/") == 1 and first not in ("", ".") and Path(first).is_dir())
    )
    if local:
        parent = next((p for p in path.parents if p.is_dir()), None)
        # os.path.join(..., "") ends the name with one separator, also for the root "/".
        where = f" ({os.path.join(parent, '')} exists)" if parent not in (None, Path(".")) else ""
        raise FileNotFoundError(
            f"{what} {text}: no such local directory{where}; a Hub model is named org/name"
        )


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A model's ``config.json``: a JSON object, or a clear error naming the file."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _config_type(tp: Any) -> Any:
    """An ``__init__`` annotation as the recipe checker knows types: any sequence is a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_config_type(a) for a in args)]  # noqa: UP007
    if origin in (Sequence, collections.abc.Sequence, list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple[tuple(_config_type(a) for a in args)]
        return tuple[(_config_type(args[0]) if args else Any), ...]
    return tp


def check_model_config(cls: type, config: dict[str, Any], where: str | Path) -> None:
    """Refuse a ``config.json`` that ``cls`` was not saved from: another ``model_kind``, a key
    its constructor does not take, or a value of the wrong type (one line naming the file and
    the key). Ranges are checked by the constructors themselves."""
    from cd2p.config import RecipeError, coerce_value

    kind = config.get("model_kind")
    if kind is not None and kind != cls.model_kind:
        raise ValueError(
            f"{where}: model_kind is {kind!r}, but {cls.__name__} loads {cls.model_kind!r} "
            "models; load it with cd2p.from_pretrained, which picks the class from model_kind"
        )
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key, value in config.items():
        if key == "model_kind":
            continue
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r} for a {cls.__name__}{hint}")
        if key == "backbone" and isinstance(value, dict):
            from cd2p.models.backbone import Cd2pBackbone

            check_model_config(Cd2pBackbone, value, f"{where} (backbone)")
            continue
        try:
            coerce_value(value, _config_type(hints.get(key, Any)), key)
        except RecipeError as exc:
            raise ValueError(f"{where}: {exc}") from None


class StrictLoadError(ValueError):
    """Weights that do not match the model exactly (missing, unexpected or mis-shaped keys)."""


def load_state_dict_strict(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``model.safetensors`` into ``model``; any key or shape difference is an error."""
    path = Path(path)
    expected = model.state_dict()
    with reading(path, "save or download the model again"), \
            safe_open(str(path), framework="pt", device="cpu") as f:
        found = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        mismatched = sorted(
            f"{k}: file {tuple(found[k])} vs model {tuple(expected[k].shape)}"
            for k in set(found) & set(expected)
            if tuple(found[k]) != tuple(expected[k].shape)
        )
        if missing or unexpected or mismatched:
            lines = [f"{path} does not match {type(model).__name__}:"]
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            ):
                if keys:
                    more = f", ... ({len(keys)} in all)" if len(keys) > 20 else ""
                    shown = ", ".join(keys[:20]) + more
                    lines.append(f"  {title}: {shown}")
            raise StrictLoadError("\n".join(lines))
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    model.load_state_dict(state, strict=True)


class Cd2pHubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` with cd2p's rules: strict safetensors loading on CPU, a
    ``model_kind`` recorded in ``config.json``, and model cards rendered from ``hubcards/``."""

    model_kind: str = "backbone"
    #: Constructor arguments of optional parts (name -> the default that leaves the part out):
    #: at their default they are left out of ``config.json``, so that a model without the part
    #: saves exactly as it did before the option existed.
    optional_config: dict[str, Any] = {}

    def __init_subclass__(
        cls,
        *args,
        model_kind: str | None = None,
        optional_config: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        if model_kind is not None:
            cls.model_kind = model_kind
        if optional_config is not None:
            cls.optional_config = {**cls.optional_config, **optional_config}
        kwargs.setdefault("library_name", "cd2p")
        kwargs.setdefault("license", "apache-2.0")
        kwargs.setdefault("tags", ["point-cloud", "3d", "knowledge-distillation", "cd2p"])
        kwargs.setdefault("model_card_template", hubcard_path(cls.model_kind).read_text())
        super().__init_subclass__(*args, **kwargs)

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls, *args, **kwargs)
        config = instance._hub_mixin_config
        if isinstance(config, dict) and cls.optional_config:
            instance._hub_mixin_config = {
                k: v
                for k, v in config.items()
                if not (k in cls.optional_config and v == cls.optional_config[k])
            }
        return instance

    # -- saving -----------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        # Written under a temporary name and renamed, so a crash never leaves half a file.
        with atomic_output(Path(save_directory) / WEIGHTS_NAME) as tmp:
            meta = {"format": "pt", "cd2p_model_kind": self.model_kind}
            save_model(self, str(tmp), metadata=meta)
        config = dict(self._hub_mixin_config or {})
        config["model_kind"] = self.model_kind
        atomic_write_json(Path(save_directory) / CONFIG_NAME, config, sort_keys=True)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any):  # noqa: D102
        kwargs.setdefault("model_card_kwargs", {})
        return super().save_pretrained(save_directory, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Render ``hubcards/<model_kind>.md`` with the config, size and any run details.

        Keyword arguments (all optional): ``repo_id``, ``metrics`` (name -> number, the run's
        evaluation), ``recipe`` (a recipe dataclass, a mapping or YAML text), ``training``
        (label -> value, e.g. steps), ``dataset`` (a name, or a mapping with ``name``, ``id``,
        ``split``) and ``base_model`` (the Hub id it was fine-tuned from). The YAML metadata
        (license, tags, datasets, ``base_model``, ``model-index``) is built with
        ``ModelCardData`` / ``EvalResult`` so that the Hub reads it.
        """
        context = card_context(
            model_kind=self.model_kind,
            class_name=type(self).__name__,
            config=dict(self._hub_mixin_config or {}),
            num_parameters=sum(p.numel() for p in self.parameters()),
            **kwargs,
        )
        card_data = card_metadata(context, self._hub_mixin_info.model_card_data)
        return ModelCard.from_template(
            card_data=card_data,
            template_str=self._hub_mixin_info.model_card_template,
            repo_url=self._hub_mixin_info.repo_url,
            paper_url=self._hub_mixin_info.paper_url,
            docs_url=self._hub_mixin_info.docs_url,
            **context,
        )

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load from a saved directory or a Hub id (strictly, on CPU, in eval mode); a missing
        local-looking path fails at once (:func:`check_local_path`), and ``config.json`` is
        checked before anything is built (:func:`check_model_config`)."""
        check_local_path(pretrained_model_name_or_path)
        name = str(pretrained_model_name_or_path)
        if os.path.isdir(name):
            config_file = os.path.join(name, CONFIG_NAME)
        else:
            keep = ("revision", "cache_dir", "force_download", "token", "local_files_only")
            config_file = hf_hub_download(
                repo_id=name, filename=CONFIG_NAME, **{k: v for k, v in kwargs.items() if k in keep}
            )
        if os.path.isfile(config_file):
            check_model_config(cls, read_model_config(config_file), config_file)
        cls._config_file = config_file  # named by construction errors in _from_pretrained
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ):
        if not strict:
            raise ValueError("cd2p models always load strictly; convert foreign checkpoints first")
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, WEIGHTS_NAME)
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                if not os.path.isfile(os.path.join(model_id, name)):
                    raise FileNotFoundError(
                        f"{os.path.join(model_id, name)} not found: "
                        "not a saved cd2p model directory"
                    )
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:  # values no model can be built from
            where = getattr(cls, "_config_file", None) or model_id
            raise ValueError(f"{where}: cannot build a {cls.__name__} from it: {exc}") from None
        load_state_dict_strict(model, model_file)
        model.to(map_location)
        model.eval()
        return model


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Cd2pHubMixin",
    "StrictLoadError",
    "check_local_path",
    "load_state_dict_strict",
]
