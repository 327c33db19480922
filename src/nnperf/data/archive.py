"""Extracting dataset archives without letting a member land outside the folder extracted into.

A tar member's name and a link's target come from the archive, not from the user: an absolute
name, a '..' component or a link pointing out of the folder would write (or later read) anywhere
the user can. Such archives are refused whole, with one line naming the member, before anything
is extracted. Where Python has tarfile's "data" filter (3.12+, backported to 3.8.17, 3.9.17,
3.10.12, 3.11.4) it is applied as well: it also drops set-uid bits and refuses device files.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from ..errors import UsageError

# What the data filter raises; an empty tuple (matches nothing) where Python has no such filter.
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _unsafe_name(name: str) -> str | None:
    """Why `name` (a member name or a link target, '/'-separated) could leave the folder, or None."""
    path = PurePosixPath(name)
    if path.is_absolute():
        return "is an absolute path"
    if ".." in path.parts:
        return "has a '..' component"
    return None


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could write or point outside the destination, or None if it cannot.

    Link targets may only descend (no absolute path, no '..'): a chain of descending links cannot
    climb out, whereas judging '..' targets by their text is fooled by links to links."""
    reason = _unsafe_name(member.name)
    if reason:
        return f"member {member.name!r} {reason}"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return f"member {member.name!r} is a device, fifo or other special file"
    if member.issym() or member.islnk():
        reason = _unsafe_name(member.linkname)
        if reason:
            return f"member {member.name!r} links to {member.linkname!r}, which {reason}"
    return None


def extract_tar(archive: Path, dest: Path, flag: str) -> None:
    """Extract every member of `archive` under `dest`, or refuse the archive in one line
    (`flag` says which option named it) if any member could land outside `dest`."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                reason = unsafe_member(member)
                if reason:
                    raise UsageError(f"{flag} {archive}: refused to extract: {reason}; a dataset archive "
                                     "holds only plain files and folders inside it")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # every member was checked above
                tar.extractall(dest, members=members)
    except _FILTER_ERROR as e:  # what the data filter refuses beyond the checks above
        raise UsageError(f"{flag} {archive}: refused to extract: {e}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UsageError(f"{flag} {archive}: cannot extract ({e})") from None
