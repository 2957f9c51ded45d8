"""User-facing errors. The CLI prints these as one line (no traceback) and exits 2."""


class CLBenchError(Exception):
    """Base class: the message must name the culprit (file, key or value) and what is valid."""


class ConfigError(CLBenchError):
    """A config value or group choice is invalid."""


class DataError(CLBenchError):
    """A data file is missing or malformed."""


class ModelLoadError(CLBenchError):
    """A model or tokenizer could not be loaded."""


class TrainingError(CLBenchError):
    """Training diverged (NaN/inf) or ran out of memory."""
