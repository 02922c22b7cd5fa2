"""Every registered method passes the shared contract: each has a `MethodContract` subclass in a tests/test_*.py file
(collected by pytest), and each registered module imports with its ``CONFIG`` dataclass and ``train``."""

import dataclasses
import importlib
from pathlib import Path

from method_contract import MethodContract

from erase.registry import get_method, list_methods
from erase.training.config import MethodConfig

TESTS = Path(__file__).parent


def contracts() -> dict[str, list[type]]:
    """Method name -> its contract classes, from every tests/test_*.py that mentions `MethodContract`."""
    for path in sorted(TESTS.glob("test_*.py")):
        if path.stem != Path(__file__).stem and "MethodContract" in path.read_text(encoding="utf-8"):
            importlib.import_module(path.stem)
    found: dict[str, list[type]] = {}
    todo = list(MethodContract.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.method:
            found.setdefault(cls.method, []).append(cls)
    return found


def test_every_registered_method_has_a_contract():
    found = contracts()
    registered = [spec.name for spec in list_methods()]
    missing = [name for name in registered if name not in found]
    assert not missing, (
        f"registered methods without a MethodContract subclass in tests/test_*.py: {', '.join(missing)}; "
        "add a tests/test_NAME.py subclassing it (README: Adding a method)"
    )
    assert not set(found) - set(registered), "a contract names a method that is not registered"
    for name, classes in found.items():
        uncollected = [c.__name__ for c in classes if not c.__name__.startswith("Test")]
        assert not uncollected, f"{name}: pytest collects only classes named Test*: {uncollected}"


def test_every_registered_module_imports_with_a_config_and_a_trainer():
    for spec in list_methods():
        module = get_method(spec.name)
        assert dataclasses.is_dataclass(module.CONFIG) and issubclass(module.CONFIG, MethodConfig), spec.name
        assert callable(module.train), spec.name
        assert module.CONFIG.KINDS and set(module.CONFIG.KINDS) <= {"lora", "delta", "sparse"}, spec.name
