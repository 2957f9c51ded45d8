"""User-facing errors. The CLI prints these as one line (no traceback) and exits 2."""


class CLBenchError(Exception):
    """Base class: the message must name the culprit (file, key or value) and what is valid."""

    readme_section: str | None = None  # README section the CLI points at after the message


class ConfigError(CLBenchError):
    """A config value or group choice is invalid."""


class RunDirError(ConfigError):
    """A file of a run dir is damaged (truncated, empty, not what it should hold)."""


class DataError(CLBenchError):
    """A data file is missing or malformed."""

    readme_section = "Getting the data"


class ModelLoadError(CLBenchError):
    """A model or tokenizer could not be loaded."""

    readme_section = "Getting a model"


class TrainingError(CLBenchError):
    """Training diverged (NaN/inf) or ran out of memory."""
