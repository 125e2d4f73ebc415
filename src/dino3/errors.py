"""The errors dino3 raises for user mistakes and bad inputs. Each message names the thing and the remedy."""


class Dino3Error(Exception):
    """Base class of dino3's own errors."""


class ConfigError(Dino3Error, ValueError):
    """A configuration value that no model can be built from."""


class UnknownModelError(Dino3Error, ValueError):
    """A model name that is neither a preset, a hub id nor a local path."""


class CheckpointError(Dino3Error, ValueError):
    """A checkpoint that cannot be loaded as it is: missing, unexpected or mis-shaped tensors, a bad file."""


class HubAccessError(Dino3Error, OSError):
    """The hub refused or could not serve a file: gated repo, missing token, unknown repo, offline."""
