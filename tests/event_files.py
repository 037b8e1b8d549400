"""Reading a run's TensorBoard event files back the way TensorBoard does, without TensorBoard.

An event file is a sequence of TFRecords: length (8 bytes, little-endian),
the length's masked CRC-32C (4), the serialized ``Event`` protobuf, its masked
CRC-32C (4). Every record is checked here, so a file cut short or garbled
fails loudly. :func:`scalars` then replays the files in the order they were
written, applying each purge (a ``SessionLog.START`` at step s hides every
earlier event at a step >= s) as TensorBoard does, and keeps every surviving
point, so a step logged twice shows up twice.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event, SessionLog


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[Event]:
    """The events of one file, every record's length and CRCs checked."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8 : at + 12])
        body = data[at + 12 : at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
        assert header_crc == _masked_crc(header) and body_crc == _masked_crc(body), f"{path} at byte {at}"
        events.append(Event.FromString(body))
        at += 16 + length
    return events


def event_files(folder: Path) -> list[Path]:
    """The event files in ``folder``, oldest first (by the time of their first event)."""
    found = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.")]
    return sorted(found, key=lambda p: read_events(p)[0].wall_time)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows from ``folder``: {tag: [(step, value), ...] in write order}."""
    shown: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(folder):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown
