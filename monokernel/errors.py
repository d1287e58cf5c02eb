"""Errors a user can act on: each names the problem and the fix."""


class MonokernelError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class UnsupportedModelError(MonokernelError):
    """The checkpoint asks for an architecture or a config value the engine cannot honour."""


class CheckpointError(MonokernelError):
    """A checkpoint is missing files, has truncated files or tensors of the wrong shape."""


class InputError(MonokernelError):
    """A prompt, token id or generation argument is out of range."""


class EngineBusy(InputError):
    """An Engine got a second request while one was still running (e.g. a stream not yet finished)."""


class InsufficientMemory(MonokernelError):
    """The model, its KV cache and the workspace do not fit in the device's free memory."""


class CompileError(MonokernelError):
    """The generated kernel did not compile; carries the compiler log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(f"{message}\n--- compiler log ---\n{log}" if log else message)
        self.log = log


class KernelRuntimeError(MonokernelError):
    """The megakernel reported a failure (e.g. a dependency wait that timed out)."""
