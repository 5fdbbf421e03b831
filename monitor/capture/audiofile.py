"""Reading audio files: the one reader behind the file source, `analyze`, `learn` and the demo.

`AudioFile` reads a file in blocks into the caller's array and knows what the header
promised, so a file cut short or damaged is named in one line however it is read
(`x.wav: ended after 15990 of 32000 frames the header promised`). `read_audio` reads a
whole file (or its start) at once. Both raise SourceError, one line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import numpy as np
import soundfile as sf

from monitor.errors import SourceError, one_line

__all__ = ["AudioFile", "promised_frames", "read_audio", "truncation_warning"]

_ERRORS = (sf.SoundFileError, OSError, RuntimeError)  # what libsndfile raises on damage
_OPEN_ERRORS = (*_ERRORS, TypeError, ValueError)  # headerless RAW: no rate to read it at


class AudioFile:
    """An audio file (WAV, FLAC, OGG, ... as libsndfile reads them) open for reading.

    Raises SourceError if it cannot be opened. `read_into` fills `block` (float32, shape
    (frames, channels), C-contiguous) and returns how many frames it holds, 0 at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"cannot read audio file {self.path}: no such file")
        try:
            # Bytes: a name that is not UTF-8 (old Samba shares, Latin-1 drives) still opens.
            self._file = sf.SoundFile(os.fsencode(self.path))
        except _OPEN_ERRORS as err:
            raise SourceError(f"cannot read audio file {self.path}: {one_line(err)}") from err
        self.sample_rate: int = self._file.samplerate
        self.channels: int = self._file.channels
        self.promised = promised_frames(self.path, self._file)
        """Frames the header promises (None: it does not say)."""
        self.frames_read = 0

    def read_into(self, block: np.ndarray) -> int:
        """Read up to len(block) frames into `block`; SourceError (the truncation line) if
        the decoder fails."""
        try:
            n = int(self._file.read(block.shape[0], dtype="float32", always_2d=True,
                                    out=block).shape[0])
        except _ERRORS as err:
            raise SourceError(self.truncation(err) or one_line(err)) from err
        self.frames_read += n
        return n

    def truncation(self, error: BaseException | None = None) -> str | None:
        """The line naming a file cut short (after the end) or damaged (`error`)."""
        return truncation_warning(self.path, self.frames_read, self.promised, error)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def read_audio(path: Path, *, max_seconds: float | None = None,
               dtype: str = "float32") -> tuple[np.ndarray, int]:
    """(samples of shape (frames, channels), sample rate) of a whole file, or of its first
    `max_seconds`; float32 unless `dtype` says "float64". SourceError if it cannot be read."""
    with AudioFile(path) as audio:
        frames = -1 if max_seconds is None else int(max_seconds * audio.sample_rate)
        try:
            data = audio._file.read(frames, dtype=dtype, always_2d=True)
        except _ERRORS as err:
            raise SourceError(f"cannot read audio file {path}: {one_line(err)}") from err
        return data, audio.sample_rate


def promised_frames(path: Path, handle: sf.SoundFile) -> int | None:
    """Frames the file's header promises, or None when it does not say.

    libsndfile reports how many frames a WAV really holds, not what its header promised,
    so a WAV cut short in transfer would look whole: its `data` chunk size is read here.
    Other formats: libsndfile's count (a FLAC's STREAMINFO), when the file is seekable.
    """
    if handle.format in ("WAV", "WAVEX", "RF64"):
        return _wav_data_frames(path)
    return handle.frames if handle.seekable() else None


def _wav_data_frames(path: Path) -> int | None:
    """Frames promised by a RIFF/RF64 WAV header (`data` size / block align); None when the
    header gives no size (streamed WAVs write 0 or 0xFFFFFFFF) or cannot be read."""
    try:
        with path.open("rb") as handle:
            riff = handle.read(12)
            if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
                return None
            size64 = None
            block_align = 0
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return None
                chunk, size = header[:4], int.from_bytes(header[4:], "little")
                if chunk == b"ds64":
                    body = handle.read(size)
                    size64 = int.from_bytes(body[8:16], "little") if len(body) >= 16 else None
                    size -= len(body)
                elif chunk == b"fmt ":
                    body = handle.read(size)
                    block_align = int.from_bytes(body[12:14], "little") if len(body) >= 14 else 0
                    size -= len(body)
                elif chunk == b"data":
                    if riff[:4] == b"RF64" and size == 0xFFFFFFFF:
                        size = size64 if size64 is not None else 0
                    if size in (0, 0xFFFFFFFF) or block_align <= 0:
                        return None
                    return size // block_align
                handle.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return None


def truncation_warning(path: Path, read: int, promised: int | None,
                       error: BaseException | None = None) -> str | None:
    """The one line that names a file cut short or damaged: how much was read of how much
    its header promised, and the decoder's error if one stopped it; None if it is whole."""
    cause = "" if error is None else f" ({one_line(error)})"
    if promised is not None and (read < promised or error is not None):
        return f"{path}: ended after {read} of {promised} frames the header promised{cause}"
    if error is not None:
        return f"{path}: read error after {read} frames{cause}"
    return None
