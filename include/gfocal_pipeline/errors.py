"""Exception types. Each message names the offending input and how to fix it."""

from __future__ import annotations


class GfocalError(Exception):
    """Base class of every error the library raises on bad input or a failed step."""


class CheckpointError(GfocalError):
    """The checkpoint is missing, unreadable, unsafe or does not match the model layout."""


class ExportError(GfocalError):
    """ONNX export failed or produced a graph that does not match PyTorch."""


class DatasetError(GfocalError):
    """The COCO root, annotation file, manifest or preprocessed inputs are unusable."""


class BackendError(GfocalError):
    """An inference backend or an external tool (atc, msame, ais_bench) failed."""


class OmInputMismatchError(BackendError):
    """The run's input is not the OM's: deterministic, so a retry cannot heal it."""


class EvaluationError(GfocalError):
    """Outputs cannot be evaluated (missing images, mismatched manifest, ...)."""


class ConfigError(GfocalError):
    """A run parameter is invalid; the message names it and the accepted values."""


class StepBusyError(GfocalError):
    """Another process holds the lock of the same step on the same run directory."""


def os_error_fix(exc: OSError) -> str:
    """How to fix the `OSError` `exc` (disk full: with the free space left), for a message."""
    import errno
    import shutil
    from pathlib import Path

    fixes = {
        errno.ENOSPC: "free space on that file system or point the run at a larger one (work_dir)",
        errno.EDQUOT: "raise the disk quota or point the run at another file system (work_dir)",
        errno.EROFS: "the file system is read-only: use a writable work_dir / output path",
        errno.EACCES: "fix the permissions or use a path this user can write (and read)",
        errno.EPERM: "fix the permissions or use a path this user can write (and read)",
        errno.ENOENT: "check the path (it must exist on this host; shared paths must be mounted alike)",
        errno.EISDIR: "give a file path, not a directory",
        errno.ENOTDIR: "a parent of that path is a file, not a directory: choose another path",
        errno.EEXIST: "remove what is in the way or choose another path",
        errno.EFBIG: "the file exceeds the file size limit (ulimit -f) or the file system's largest "
        "file: raise the limit or point the run at another file system (work_dir)",
        errno.ENAMETOOLONG: "use a shorter path",
        errno.ELOOP: "a symbolic link in that path loops: fix the link",
    }
    fix = fixes.get(exc.errno or -1, "check the path and the file system")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        probe = Path(exc.filename or ".")
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
            fix = f"only {free / 2**20:.1f} MiB are free at {str(probe)!r}; {fix}"
        except OSError:
            pass
    return fix


def describe_os_error(exc: OSError, doing: str) -> GfocalError:
    """The project error for an `OSError` met while `doing` something: names the path and the fix.

    One place decides the wording, so the CLI and the operators say the same thing for a full disk,
    a read-only folder, a missing file or a folder where a file was expected."""
    path = exc.filename or "(unknown path)"
    reason = exc.strerror or str(exc)
    return GfocalError(f"{doing}: {path!r}: {reason}; {os_error_fix(exc)}")
