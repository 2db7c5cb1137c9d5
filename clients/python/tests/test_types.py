"""The event models: the original suite's event-type tests (seed 1-6) and the validation the
original had, plus the SSE parser."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from eventqueue import (
    ArtifactEvent,
    CompleteEvent,
    ErrorEvent,
    EventType,
    ProgressEvent,
    StatusEvent,
    TaskState,
    create_artifact_event,
    create_complete_event,
    create_error_event,
    create_progress_event,
    create_status_event,
    is_terminal,
)
from eventqueue._sse import Frame, SSEParser
from eventqueue.types import EVENT_ADAPTER, event_json


def test_status_event_keeps_its_fields() -> None:  # seed 1
    e = create_status_event("wf_1", "tenant1", TaskState.WORKING, "planning", "Planning")
    assert (e.task_id, e.tenant_id, e.state, e.phase, e.message) == (
        "wf_1",
        "tenant1",
        "working",
        "planning",
        "Planning",
    )
    assert e.event_type == EventType.STATUS == "status"
    assert re.fullmatch(r"evt_[0-9a-f]{12}", e.event_id)
    assert isinstance(e.timestamp, datetime) and e.timestamp.tzinfo is not None
    assert e.timestamp.utcoffset() == timezone.utc.utcoffset(None)
    assert e.offset is None


def test_progress_percentage_is_computed() -> None:  # seed 2
    e = create_progress_event("j", "t", current=5, total=10, step="video_5", details={"v": 1})
    assert e.percentage == 50.0
    assert (e.step, e.details, e.event_type) == ("video_5", {"v": 1}, "progress")
    assert create_progress_event("j", "t", current=0, total=0).percentage == 0
    # Left out of the constructor, it is computed the same way (the original required it).
    assert ProgressEvent(task_id="j", tenant_id="t", current=1, total=4).percentage == 25.0
    assert ProgressEvent(task_id="j", tenant_id="t", current=0, total=0).percentage == 0.0
    assert (
        ProgressEvent(task_id="j", tenant_id="t", current=1, total=4, percentage=30).percentage
        == 30
    )


def test_artifact_event() -> None:  # seed 3
    e = create_artifact_event("wf", "t", "search_result", {"results": [1, 2]}, is_partial=True)
    assert (e.artifact_type, e.data, e.is_partial, e.event_type) == (
        "search_result",
        {"results": [1, 2]},
        True,
        "artifact",
    )
    assert re.fullmatch(r"art_[0-9a-f]{8}", e.artifact_id)


def test_error_event() -> None:  # seed 4
    e = create_error_event(
        "wf", "t", "ValidationError", "Invalid input", "E42", {"field": "q"}, recoverable=False
    )
    assert (e.error_type, e.error_message, e.error_code, e.context, e.recoverable) == (
        "ValidationError",
        "Invalid input",
        "E42",
        {"field": "q"},
        False,
    )
    assert create_error_event("wf", "t", "X", "y").recoverable is True


def test_complete_event() -> None:  # seed 5
    e = create_complete_event("wf", "t", {"answer": 42}, "done", execution_time_seconds=10.5)
    assert (e.result, e.summary, e.execution_time_seconds, e.event_type) == (
        {"answer": 42},
        "done",
        10.5,
        "complete",
    )


def test_event_json_has_ids_and_state_value() -> None:  # seed 6
    e = create_status_event("wf_9", "tenant9", TaskState.WORKING)
    text = e.model_dump_json()
    assert '"wf_9"' in text and '"tenant9"' in text and '"working"' in text
    wire = json.loads(event_json(e))
    assert list(wire)[:5] == ["event_id", "task_id", "tenant_id", "timestamp", "event_type"]
    assert "offset" not in wire
    assert wire["timestamp"].endswith("Z")


def test_the_originals_validation() -> None:
    with pytest.raises(ValidationError):
        ProgressEvent(task_id="j", tenant_id="t", current=-1, total=3)
    with pytest.raises(ValidationError):
        ProgressEvent(task_id="j", tenant_id="t", current=1, total=3, percentage=101)
    with pytest.raises(ValidationError):
        StatusEvent(task_id="j", tenant_id="t", state="sleeping")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ArtifactEvent(task_id="j", tenant_id="t", artifact_type="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CompleteEvent(task_id="j", tenant_id="t")  # type: ignore[call-arg]


def test_naive_timestamps_are_utc_on_the_wire() -> None:
    e = StatusEvent(
        task_id="j", tenant_id="t", state=TaskState.PENDING, timestamp=datetime(2026, 1, 2, 3, 4, 5)
    )
    assert json.loads(event_json(e))["timestamp"] == "2026-01-02T03:04:05Z"


def test_wire_json_parses_into_the_right_class() -> None:
    for e in (
        create_status_event("j", "t", TaskState.FAILED),
        create_progress_event("j", "t", 1, 2),
        create_artifact_event("j", "t", "a", {}),
        create_error_event("j", "t", "E", "m"),
        create_complete_event("j", "t", {}),
    ):
        back = EVENT_ADAPTER.validate_json(event_json(e))
        assert type(back) is type(e)
        assert back == e


def test_every_event_meets_the_protocol() -> None:
    from eventqueue import TaskEventProtocol

    assert isinstance(create_progress_event("j", "t", 1, 2), TaskEventProtocol)
    assert not isinstance(object(), TaskEventProtocol)


def test_terminal_events() -> None:
    assert is_terminal(create_complete_event("j", "t", {}))
    assert is_terminal(create_error_event("j", "t", "E", "m", recoverable=False))
    assert not is_terminal(create_error_event("j", "t", "E", "m"))
    assert is_terminal(create_status_event("j", "t", TaskState.CANCELLED))
    assert is_terminal(create_status_event("j", "t", TaskState.FAILED))
    assert not is_terminal(create_status_event("j", "t", TaskState.COMPLETED))
    assert not is_terminal(
        ErrorEvent(task_id="j", tenant_id="t", error_type="E", error_message="m")
    )


STREAM = (
    b'event: connected\ndata: {"type":"connected","offset":0}\n\n'
    b": keepalive\n\n"
    b'id: 0\nevent: status\ndata: {"a":1}\n\n'
    b"id: 1\nevent: progress\ndata: line one\ndata: line two\n\n"
    b"data: unnamed\n\n"
)
EXPECTED = [
    Frame(None, b"connected", b'{"type":"connected","offset":0}'),
    Frame(b"0", b"status", b'{"a":1}'),
    Frame(b"1", b"progress", b"line one\nline two"),
    Frame(None, b"message", b"unnamed"),
]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_at_every_chunk_boundary(line_end: bytes) -> None:
    stream = STREAM.replace(b"\n", line_end)
    for cut in range(len(stream) + 1):
        for step in (1, 7, len(stream) or 1):
            parser = SSEParser()
            frames: list[Frame] = []
            frames += parser.feed(stream[:cut])
            rest = stream[cut:]
            for i in range(0, len(rest), step):
                frames += parser.feed(rest[i : i + step])
            assert frames == EXPECTED, (line_end, cut, step)
            assert parser.pending == b""


def test_sse_parser_keeps_an_incomplete_frame() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 5\nevent: status\ndata: {}") == []
    assert parser.feed(b"\n\n") == [Frame(b"5", b"status", b"{}")]


def test_sse_parser_runs_of_event_frames() -> None:
    run = b"".join(b'id: %d\nevent: status\ndata: {"n":%d}\n\n' % (i, i) for i in range(50))
    expected = [Frame(b"%d" % i, b"status", b'{"n":%d}' % i) for i in range(50)]
    for cut in range(0, len(run), 37):
        parser = SSEParser()
        assert parser.feed(run[:cut]) + parser.feed(run[cut:]) == expected
    # A run with a comment or a control frame in it takes the general path, same result.
    mixed = b": keepalive\n\n" + run + b'event: gap\ndata: {"x":1}\n\n'
    assert SSEParser().feed(mixed) == [*expected, Frame(None, b"gap", b'{"x":1}')]
