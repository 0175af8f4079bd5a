"""Fetch, verify and unpack the CIFAR-100 archive; the errors every data loader raises.

The only network access in the package lives here. The rules it keeps:

* A download goes to a temporary name in the target folder (``.<archive>.<random>.part``),
  is checked for its exact size and md5, and only then renamed onto the final name
  with ``os.replace`` (atomic on one file system). Any failure, Ctrl-C included,
  deletes the temporary file, so a later run never mistakes a partial download for
  the archive.
* Connection and every read wait at most ``timeout`` seconds, so a machine without
  network fails within seconds, not minutes.
* Extraction accepts only regular files and folders whose paths stay inside the
  target folder (no absolute paths, no ``..``, no links or devices), unpacks into a
  temporary folder and moves the finished files into place one by one.
* ``NPSOFTMAX_OFFLINE=1`` forbids any download.

The URL, sizes and checksums are module constants, read at call time, and every
function takes them as parameters too, so tests can point the real code at a local
server and a small archive.
"""

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import http.client
from pathlib import Path, PurePosixPath

#: Where the official archive is served.
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
#: File name of the archive inside ``data_dir``.
ARCHIVE_NAME = "cifar-100-python.tar.gz"
#: Folder the archive unpacks to, inside ``data_dir``.
FOLDER_NAME = "cifar-100-python"
#: Exact size in bytes and md5 of the official archive.
ARCHIVE_SIZE = 169_001_437
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
#: md5 of the three files inside the official archive (published; see ``verify_file``).
FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
#: Seconds to wait for the connection and for each read of the body.
DOWNLOAD_TIMEOUT = 15.0
#: Environment variables: the default data folder, and the switch that forbids downloads.
DATA_DIR_ENV = "NPSOFTMAX_DATA"
OFFLINE_ENV = "NPSOFTMAX_OFFLINE"

_CHUNK_BYTES = 1 << 20


class DatasetError(RuntimeError):
    """Base class: the dataset could not be obtained or read."""


class DatasetNotFoundError(DatasetError):
    """No usable copy on disk and none could be downloaded (missing, offline, network failure)."""


class DatasetCorruptError(DatasetError):
    """A file on disk is there but unusable: wrong size or md5, truncated, or malformed."""


def default_data_dir():
    """``$NPSOFTMAX_DATA`` if set, else ``~/.cache/npsoftmax`` (a ``Path``; not created)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "npsoftmax"


def resolve_data_dir(data_dir=None):
    """The folder that holds ``cifar-100-python/`` or the archive, as an absolute ``Path``."""
    if data_dir is None:
        return default_data_dir().absolute()
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a str or path-like or None, got {type(data_dir).__name__}")
    return Path(data_dir).expanduser().absolute()


def offline_mode():
    """True when ``NPSOFTMAX_OFFLINE`` is set to 1 / true / yes / on (case-insensitive)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def manual_instructions(data_dir, url=None, size=None, md5=None):
    """A few lines telling a person exactly how to place the archive by hand (a ``str``)."""
    data_dir = resolve_data_dir(data_dir)
    url = CIFAR100_URL if url is None else url
    size = ARCHIVE_SIZE if size is None else size
    md5 = ARCHIVE_MD5 if md5 is None else md5
    archive = data_dir / ARCHIVE_NAME
    return (
        "To place the dataset by hand:\n"
        f"  1. download {url}\n"
        f"     ({size:,} bytes, md5 {md5})\n"
        f"  2. save it as {archive}\n"
        f"     and check it:  md5sum {archive}\n"
        f"  3. run again: it is verified and unpacked to {data_dir / FOLDER_NAME}/\n"
        f"     (or unpack it yourself:  tar -xzf {archive} -C {data_dir})\n"
        f"Use another folder with data_dir=... (--data-dir on the command line) or the {DATA_DIR_ENV} environment variable; "
        f"{OFFLINE_ENV}=1 forbids downloading."
    )


def file_md5(path):
    """Hex md5 of the file at ``path``, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path, size=None, md5=None):
    """Raise ``DatasetCorruptError`` unless ``path`` has the given size (bytes) and md5.

    Either check is skipped when its expected value is None. The size is compared
    first because it is free and catches truncated downloads without reading the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: expected a file, found nothing")
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        raise DatasetCorruptError(
            f"{path}: expected {size:,} bytes, found {found_size:,} bytes "
            "(a truncated or different file)")
    if md5 is not None:
        found_md5 = file_md5(path)
        if found_md5 != md5.lower():
            raise DatasetCorruptError(f"{path}: expected md5 {md5}, found md5 {found_md5}")


def download_archive(data_dir, *, url=None, size=None, md5=None, timeout=None, progress=True):
    """Download ``url`` to ``data_dir / ARCHIVE_NAME`` atomically and return that ``Path``.

    ``size`` (bytes), ``md5`` (hex) and ``timeout`` (seconds) default to the module
    constants at call time. The body is streamed into a temporary file in the same
    folder, checked for size and md5, then renamed into place; on any failure the
    temporary file is removed and ``DatasetNotFoundError`` is raised with the reason
    and the manual instructions. ``NPSOFTMAX_OFFLINE=1`` makes this raise at once.
    """
    data_dir = resolve_data_dir(data_dir)
    url = CIFAR100_URL if url is None else url
    size = ARCHIVE_SIZE if size is None else size
    md5 = ARCHIVE_MD5 if md5 is None else md5
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    help_text = manual_instructions(data_dir, url, size, md5)
    if offline_mode():
        raise DatasetNotFoundError(
            f"downloading {url} is disabled because {OFFLINE_ENV}="
            f"{os.environ.get(OFFLINE_ENV)!r}.\n{help_text}")

    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / ARCHIVE_NAME
    handle = tempfile.NamedTemporaryFile(
        dir=data_dir, prefix=f".{ARCHIVE_NAME}.", suffix=".part", delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            _stream_to_file(url, handle, size, timeout, progress, help_text)
        try:
            verify_file(temporary, size, md5)
        except DatasetCorruptError as error:
            raise DatasetNotFoundError(f"download of {url} is unusable: {error}.\n{help_text}") from None
        os.replace(temporary, target)
    except BaseException:
        # Covers network errors, failed checks and KeyboardInterrupt alike.
        temporary.unlink(missing_ok=True)
        raise
    return target


def _stream_to_file(url, handle, size, timeout, progress, help_text):
    """Copy the body at ``url`` into the open binary ``handle``; raise DatasetNotFoundError on failure."""
    try:
        # One timeout covers the connect and every blocking read (urllib sets it on the socket).
        with urllib.request.urlopen(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            declared = int(declared) if declared is not None and declared.isdigit() else None
            if declared is not None and size is not None and declared != size:
                raise DatasetNotFoundError(
                    f"{url} announces {declared:,} bytes, expected {size:,} bytes "
                    f"(the server sent a different file).\n{help_text}")
            received = 0
            with _progress_bar(declared if declared is not None else size, progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # http.client returns a short body without complaint when the peer closes early.
            if declared is not None and received != declared:
                raise DatasetNotFoundError(
                    f"download of {url} stopped after {received:,} of {declared:,} bytes "
                    f"(connection closed early).\n{help_text}")
    except urllib.error.HTTPError as error:
        raise DatasetNotFoundError(
            f"could not download {url}: HTTP {error.code} {error.reason}.\n{help_text}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DatasetNotFoundError(
            f"could not download {url} (timeout {timeout} s): {type(error).__name__}: {reason}.\n"
            f"{help_text}") from None


def _progress_bar(total, enabled):
    """A tqdm byte counter, imported lazily so importing the package stays cheap."""
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=ARCHIVE_NAME, disable=not enabled, leave=False)


def _check_member(member, root):
    """Raise ``DatasetCorruptError`` unless tar ``member`` is a plain file/folder inside ``root``."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (parts and ":" in parts[0]):
        raise DatasetCorruptError(f"archive member {name!r} has an absolute path; refusing to unpack")
    if ".." in parts or ".." in Path(name).parts:
        raise DatasetCorruptError(f"archive member {name!r} climbs out with '..'; refusing to unpack")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DatasetCorruptError(
            f"archive member {name!r} is a {kind}; only regular files and folders are allowed")
    destination = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([destination, root]) != root:
        raise DatasetCorruptError(f"archive member {name!r} would land outside {root}; refusing to unpack")
    return destination


def extract_archive(archive, data_dir, required=("train", "test", "meta")):
    """Safely unpack ``archive`` (a .tar.gz) so ``data_dir / FOLDER_NAME`` holds its files.

    Every member is checked before anything is written (see ``_check_member``). The
    archive is unpacked into a temporary folder inside ``data_dir``; only when it is
    complete and holds ``FOLDER_NAME/<name>`` for every name in ``required`` are its
    files moved into ``data_dir / FOLDER_NAME`` (each with an atomic ``os.replace``).
    A truncated or malformed archive raises ``DatasetCorruptError`` and leaves nothing
    behind. Returns the folder ``Path``.
    """
    archive = Path(archive)
    data_dir = resolve_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{FOLDER_NAME}.", suffix=".extract"))
    root = os.path.realpath(staging)
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()  # reads the whole stream: a truncated archive fails here
                destinations = [_check_member(member, root) for member in members]
                for member, destination in zip(members, destinations):
                    if member.isdir():
                        os.makedirs(destination, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(destination), exist_ok=True)
                    # Copy the bytes ourselves: no owners, modes or times come from the archive.
                    with tar.extractfile(member) as source, open(destination, "wb") as sink:
                        shutil.copyfileobj(source, sink, _CHUNK_BYTES)
        except DatasetCorruptError as error:
            raise DatasetCorruptError(f"{archive}: {error}") from None
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DatasetCorruptError(
                f"{archive}: cannot unpack ({type(error).__name__}: {error}); "
                "the archive is truncated or not a .tar.gz") from None
        unpacked = staging / FOLDER_NAME
        missing = [name for name in required if not (unpacked / name).is_file()]
        if missing:
            raise DatasetCorruptError(
                f"{archive}: expected {FOLDER_NAME}/{{{','.join(required)}}} inside, "
                f"missing {', '.join(FOLDER_NAME + '/' + name for name in missing)}")
        folder = data_dir / FOLDER_NAME
        folder.mkdir(exist_ok=True)
        for entry in sorted(unpacked.iterdir()):
            if entry.is_file():
                os.replace(entry, folder / entry.name)
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
