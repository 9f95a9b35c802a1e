"""The one exception type the config system raises for bad user input."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file, an override or a value does not fit the schema.

    The message always names the full dotted key (``optim.lr``) and, where known, where the
    offending value came from (a YAML file or the command line).
    """


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key '<key>': <message>")`` unless ``condition`` holds (value checks a type
    check cannot make, in a stage's ``validate_config``)."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")
