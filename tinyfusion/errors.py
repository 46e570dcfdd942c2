"""The toolkit's two kinds of expected failure, apart from bugs.

`UserError` is a bad input: a path, a flag value, a checkpoint that does not fit, bad data. It is raised
where an input is checked, with a message that names the input and the fix, and a script prints it as one
line (exit status 2). `RunFailed` is a run that cannot go on for a reason the user must act on (diverged,
a run folder in use; `WriteFailed`: a disk that filled up, a folder without write permission); one line,
exit status 1. Every other exception, a
`ValueError` of an internal invariant included, is a bug: the script keeps its traceback.

This module imports nothing, so every layer (models/, processes/, the library) may raise its classes.
`UserError` subclasses `ValueError` so that callers of the library that catch `ValueError` keep working.
"""


class UserError(ValueError):
    """A bad input; the message names the input and the fix."""

    status = 2


class AmbiguousWeights(UserError):
    """Bare weights of a family's layout that do not say enough to rebuild the model (a width-pruned state dict:
    its per-block head counts are not in the tensor shapes). The family is right; the file is not enough."""


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason the user must act on (its message says what to do)."""

    status = 1


class WriteFailed(RunFailed):
    """A file could not be written (no space left, no permission, a read-only file system): the cause and the
    file are named, and the atomic write guarantees that whatever the file held before is still there."""

    def __init__(self, path, cause: OSError):
        import errno

        code = errno.errorcode.get(cause.errno, "") if cause.errno is not None else ""
        what = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(f"cannot write {str(path)!r}: {what}{f' ({code})' if code else ''}; nothing was replaced "
                         "(the write goes to a temporary file that was removed)")
        self.path, self.cause = path, cause


__all__ = ["AmbiguousWeights", "RunFailed", "UserError", "WriteFailed"]
