"""fedpeft: federated parameter-efficient fine-tuning of pre-trained transformers.

The public entry points are :func:`fedpeft.config.load_config` and
:func:`fedpeft.experiment.run_experiment`; ``fedpeft run CONFIG`` does both from the shell.
"""

from fedpeft.errors import ConfigError, DataError, FedPeftError, UpdateRejected

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FedPeftError", "UpdateRejected", "__version__"]
