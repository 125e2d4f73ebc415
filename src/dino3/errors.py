"""Every error class dino3 raises. Each message names the thing that is wrong and the remedy."""


class Dino3Error(Exception):
    """Base class of dino3's own errors."""


class ConfigError(Dino3Error, ValueError):
    """A configuration value that no model (or processor) can be built from."""


class UnknownModelError(Dino3Error, ValueError):
    """A model name that is neither a preset, a hub id nor a local path."""


class CheckpointError(Dino3Error, ValueError):
    """A checkpoint that cannot be loaded as it is: missing, unexpected or mis-shaped tensors, a bad file."""


class HubAccessError(Dino3Error, OSError):
    """The hub refused or could not serve a file: gated repo, missing token, unknown repo, offline."""


class ImageError(Dino3Error, ValueError):
    """An input that is not a usable image; the message names the input and the reason."""


class ImageTooLargeError(ImageError):
    """An image over a size limit (pixels, bytes or sides): refused before it is decoded."""


class VideoError(ImageError):
    """A video, or one frame of it, that cannot be read; the message names it (`clip.mp4#t=12.480`)."""


class QuantizationError(Dino3Error, ValueError):
    """A quantization mode that cannot run here; the message says why and what to use instead."""


class BackendError(Dino3Error, RuntimeError):
    """A runtime backend that is missing or cannot run the requested precision here."""


class ExportError(Dino3Error, RuntimeError):
    """An export that cannot be made here, or a graph that is not what dino3 promises."""


class UsageError(Dino3Error, ValueError):
    """A request that cannot be carried out as asked: options that contradict each other or do not
    apply, an output that exists, an input that matches nothing. The command line exits with 2."""


class RunLockedError(UsageError):
    """Another process is writing the same output right now."""


class BadIndexError(Dino3Error, ValueError):
    """A folder that is not a usable dino3 index: damaged, incomplete, or written in an index format
    that this dino3 does not read."""


class StaleIndexError(Dino3Error, RuntimeError):
    """An opened index whose folder now holds another index (built again since it was opened): its
    item ids would name other images. Reopen it (`Index.refresh()`, or `dino3.index.open` again)."""
