"""The exception tree: every exception the project defines is under one documented root."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import patternflow.errors
from patternflow.errors import InvalidMessage, PatternflowError

PACKAGES = ["patternflow", "operators", "state", "models", "clients", "dataflows", "advisor"]


def project_modules() -> list[ModuleType]:
    modules = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # runs a job when imported
                modules.append(importlib.import_module(info.name))
    return modules


def project_exceptions() -> list[type[BaseException]]:
    found = {
        cls
        for module in project_modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module.__name__
    }
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


EXCEPTIONS = project_exceptions()


def test_the_walk_finds_every_family() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"PatternflowError", "KafkaError", "StateError", "LLMError", "ToolError", "SettingsError"} <= names
    assert {"JobError", "InferenceTimeout", "JobSubmitError", "UseCaseError", "ReportError", "UnknownModel"} <= names


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_exception_derives_from_the_root_and_says_when_it_is_raised(exc: type[BaseException]) -> None:
    assert issubclass(exc, PatternflowError)
    assert exc.__doc__ and exc.__doc__.strip(), f"{exc.__qualname__} has no docstring"


def drawn_tree() -> set[str]:
    """The class names the tree in :mod:`patternflow.errors`' docstring draws, one a line."""
    lines = (patternflow.errors.__doc__ or "").split("::", 1)[1].split("\n\n")[1].splitlines()
    return {line.strip(" │├└─").split(" ", 1)[0] for line in lines}


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda cls: cls.__qualname__)
def test_the_root_module_draws_every_exception_in_its_tree(exc: type[BaseException]) -> None:
    assert exc.__name__ in drawn_tree()


def test_builtin_bases_callers_catch_are_kept() -> None:
    from advisor.advise import UseCaseError
    from clients.inference import InferenceTimeout
    from clients.jobs import JobSubmitError
    from models.llm import LLMError
    from operators.settings import SettingsError

    assert issubclass(InvalidMessage, ValueError) and issubclass(SettingsError, ValueError)
    assert issubclass(UseCaseError, ValueError) and issubclass(InferenceTimeout, TimeoutError)
    assert issubclass(LLMError, RuntimeError) and issubclass(JobSubmitError, RuntimeError)
