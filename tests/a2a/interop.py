"""Interop test: the real a2a-sdk client against a running `eventqueue serve`.

Run by tests/a2a/run.sh (which builds and starts the server). For each card variant (A2A 1.0
and 0.3) it resolves the agent card, gets a task, subscribes to a running task and receives
every mapped event until the task completes (with a pause longer than the client's read
timeout in between, which only the server's keepalive comments bridge), resumes a stream with
Last-Event-ID, cancels another task, and checks the error mapping. Events are produced over
eventqueue's own HTTP API. Any mismatch raises: the process exits non-zero.

ListTasks (1.0 only: 0.3 has no JSON-RPC method for it) is checked in tenants of its own: pages
walked with nextPageToken while a task is created, the status, context and status-time
filters, includeArtifacts, and that no tenant ever sees another's tasks.

With --token, the server is in token mode: the same client, given a bearer token, follows,
cancels and lists tasks of the token's tenant, and is refused without it. --other-token (a
token of another tenant) checks that listings stay within the token's tenant.

Usage: python interop.py BASE_URL [--token TOKEN --other-token TOKEN] [--pause SECONDS]
"""

import argparse
import asyncio

import httpx
from a2a.client import A2AClientError, ClientCallContext, ClientConfig, create_client
from a2a.client.card_resolver import A2ACardResolver
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.errors import (
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

ARGS = argparse.ArgumentParser()
ARGS.add_argument("base")
ARGS.add_argument("--token")
ARGS.add_argument("--other-token")
# Longer than the client's 5 s read timeout.
ARGS.add_argument("--pause", type=float, default=6.0)
ARGS = ARGS.parse_args()
BASE = ARGS.base.rstrip("/")
PAUSE = ARGS.pause


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


async def rest(http, method, path, body=None, headers=None):
    r = await http.request(method, BASE + path, json=body, headers=headers)
    if r.status_code >= 300:
        raise AssertionError(f"{method} {path}: {r.status_code} {r.text}")
    return r.json() if r.content else None


async def create_queue(http, task, headers=None):
    await rest(http, "POST", "/events/queues", {"task_id": task, "kind": "workflow"}, headers)


async def publish(http, task, *events, headers=None):
    return await rest(
        http, "POST", f"/events/queues/{task}/events", {"events": list(events)}, headers
    )


def working_at(at):
    return {"event_type": "status", "state": "working", "timestamp": at}


def timestamp(text):
    t = Timestamp()
    t.FromJsonString(text)
    return t


async def walk(client, page_size, between_pages=None, **filters):
    """Every page of a listing: (ids in order, pages, totalSize of each page)."""
    ids, pages, totals, token = [], 0, [], ""
    while True:
        page = await client.list_tasks(
            ListTasksRequest(page_size=page_size, page_token=token, **filters)
        )
        pages += 1
        check(len(page.tasks) <= page_size, "ListTasks: a page holds at most pageSize tasks")
        eq(page.page_size, page_size, "ListTasks: pageSize")
        ids += [t.id for t in page.tasks]
        totals.append(page.total_size)
        token = page.next_page_token
        if not token:
            return ids, pages, totals
        if between_pages is not None:
            await between_pages(pages)


def data_of(part):
    return MessageToDict(part)["data"]


def summarize(resp):
    """A stream response as a comparable tuple."""
    kind = resp.WhichOneof("payload")
    if kind == "status_update":
        u = resp.status_update
        parts = [MessageToDict(p) for p in u.status.message.parts]
        return ("status", TaskState.Name(u.status.state), int(u.metadata["offset"]), parts)
    if kind == "artifact_update":
        u = resp.artifact_update
        a = u.artifact
        return (
            "artifact",
            a.artifact_id,
            a.name,
            [MessageToDict(p) for p in a.parts],
            u.append,
            u.last_chunk,
            int(u.metadata["offset"]),
        )
    if kind == "task":
        return ("task", resp.task.id, TaskState.Name(resp.task.status.state))
    raise AssertionError(f"unexpected stream response {resp}")


async def variant(http, version):
    tag = version.replace(".", "")
    path = "/.well-known/agent-card.json" + ("?version=0.3" if version == "0.3" else "")
    card = await A2ACardResolver(http, BASE).get_agent_card(relative_card_path=path)
    check(card.capabilities.streaming, "card: capabilities.streaming")
    eq(len(card.supported_interfaces), 1, "card: interfaces")
    iface = card.supported_interfaces[0]
    eq(iface.url, BASE + "/a2a", "card: JSON-RPC url")
    eq(iface.protocol_binding, "JSONRPC", "card: binding")
    eq(iface.protocol_version, "1.0" if version == "1.0" else "0.3.0", "card: protocol version")
    check("Last-Event-ID" in card.description, "card: description names the resume header")
    client = await create_client(card, ClientConfig())

    # GetTask of a running task.
    job = f"job-{tag}"
    await create_queue(http, job)
    await publish(
        http,
        job,
        {"event_type": "status", "state": "working", "phase": "planning", "message": "go"},
        {"event_type": "progress", "current": 1, "total": 4, "step": "fetch"},
    )
    task = await client.get_task(GetTaskRequest(id=job))
    eq(task.id, job, "GetTask: id")
    eq(task.context_id, job, "GetTask: contextId")
    eq(TaskState.Name(task.status.state), "TASK_STATE_WORKING", "GetTask: state")
    eq(
        data_of(task.status.message.parts[0]),
        {"current": 1, "total": 4, "percentage": 25.0, "step": "fetch", "details": {}},
        "GetTask: progress data part",
    )
    eq(int(task.metadata["offset"]), 2, "GetTask: offset")

    # SubscribeToTask: the task first, then every event published after it, until complete.
    later = [
        {"event_type": "progress", "current": 2, "total": 4, "step": "fetch"},
        {"event_type": "artifact", "artifact_type": "rows", "artifact_id": "a1",
         "data": {"rows": [1]}, "is_partial": True},
        {"event_type": "artifact", "artifact_type": "rows", "artifact_id": "a1",
         "data": {"rows": [2]}},
        {"event_type": "error", "error_type": "Timeout", "error_message": "retrying",
         "recoverable": True},
        {"event_type": "status", "state": "input-required", "phase": "review"},
        {"event_type": "complete", "result": {"answer": 42}, "summary": "done",
         "execution_time_seconds": 1.5},
    ]
    received = []

    async def produce():
        await publish(http, job, *later[:3])
        # Longer than the client's 5 s read timeout: only keepalive comments keep it alive.
        await asyncio.sleep(PAUSE)
        await publish(http, job, *later[3:])

    producer = None
    async for resp in client.subscribe(SubscribeToTaskRequest(id=job)):
        received.append(summarize(resp))
        if producer is None:
            producer = asyncio.create_task(produce())
    await producer
    eq(received[0], ("task", job, "TASK_STATE_WORKING"), "stream: first the task")
    expected = [
        ("status", "TASK_STATE_WORKING", 2,
         [{"data": {"current": 2, "total": 4, "percentage": 50.0, "step": "fetch",
                    "details": {}}}]),
        ("artifact", "a1", "rows", [{"data": {"rows": [1]}}], False, False, 3),
        ("artifact", "a1", "rows", [{"data": {"rows": [2]}}], True, True, 4),
        ("status", "TASK_STATE_WORKING", 5,
         [{"text": "retrying"},
          {"data": {"error_type": "Timeout", "error_message": "retrying", "error_code": None,
                    "context": {}, "recoverable": True}}]),
        ("status", "TASK_STATE_INPUT_REQUIRED", 6,
         [{"data": {"phase": "review", "message": None}}]),
    ]
    eq(received[1:6], expected, "stream: mapped events")
    eq(len(received), 8, "stream: ends after the complete event")
    result_artifact, completed = received[6], received[7]
    complete_id = result_artifact[1]
    eq(result_artifact, ("artifact", complete_id, "result", [{"data": {"answer": 42}}],
                         False, True, 7), "stream: the result artifact")
    eq(completed, ("status", "TASK_STATE_COMPLETED", 7,
                   [{"text": "done"},
                    {"data": {"summary": "done", "execution_time_seconds": 1.5}}]),
       "stream: completed")
    info = await rest(http, "GET", f"/events/queues/{job}")
    check(info["is_finished"], "queue finished")

    # GetTask after the end: final state and both artifacts (chunks appended).
    task = await client.get_task(GetTaskRequest(id=job))
    eq(TaskState.Name(task.status.state), "TASK_STATE_COMPLETED", "GetTask: completed")
    eq([(a.artifact_id, [data_of(p) for p in a.parts]) for a in task.artifacts],
       [("a1", [{"rows": [1]}, {"rows": [2]}]), (complete_id, [{"answer": 42}])],
       "GetTask: artifacts")

    # Subscribing to a finished task is -32004; resuming before its end replays the rest.
    try:
        async for _ in client.subscribe(SubscribeToTaskRequest(id=job)):
            raise AssertionError("subscribe to a finished task yielded a result")
    except UnsupportedOperationError:
        pass
    resumed = [
        summarize(r)
        async for r in client.subscribe(
            SubscribeToTaskRequest(id=job),
            context=ClientCallContext(service_parameters={"Last-Event-ID": "5"}),
        )
    ]
    eq(resumed[0], ("task", job, "TASK_STATE_WORKING"), "resume: the task as of offset 6")
    eq([r[:2] for r in resumed[1:]],
       [("status", "TASK_STATE_INPUT_REQUIRED"), ("artifact", complete_id),
        ("status", "TASK_STATE_COMPLETED")], "resume: from offset 6")

    # CancelTask: the queue's cancellation token is set; the producer ends the task.
    victim = f"cancel-{tag}"
    await create_queue(http, victim)
    await publish(http, victim, {"event_type": "status", "state": "working"})
    task = await client.cancel_task(CancelTaskRequest(id=victim))
    eq(task.id, victim, "CancelTask: id")
    check(task.metadata["cancel_requested"], "CancelTask: cancel_requested")
    info = await rest(http, "GET", f"/events/queues/{victim}")
    check(info["is_cancelled"], "CancelTask: queue is cancelled")
    await publish(http, victim, {"event_type": "status", "state": "cancelled"})
    task = await client.get_task(GetTaskRequest(id=victim))
    eq(TaskState.Name(task.status.state), "TASK_STATE_CANCELED", "after cancel: state")
    try:
        await client.cancel_task(CancelTaskRequest(id=victim))
        raise AssertionError("cancel of a finished task succeeded")
    except TaskNotCancelableError:
        pass

    # Unknown task.
    try:
        await client.get_task(GetTaskRequest(id="no-such-task"))
        raise AssertionError("GetTask of an unknown task succeeded")
    except TaskNotFoundError:
        pass
    await client.close()
    print(f"A2A {version}: card, GetTask, SubscribeToTask ({len(received)} results), resume, "
          "CancelTask, errors: ok")


async def client_for_tenant(http, tenant):
    """A 1.0 client whose card carries the tenant in its JSON-RPC URL (open mode)."""
    card = await A2ACardResolver(http, BASE).get_agent_card(
        relative_card_path=f"/.well-known/agent-card.json?tenant_id={tenant}"
    )
    eq(card.supported_interfaces[0].url, f"{BASE}/a2a?tenant_id={tenant}", "card: tenant URL")
    return await create_client(card, ClientConfig())


async def list_tasks(http):
    """ListTasks with the real client, in two tenants of its own."""
    mine, theirs = {"X-Tenant-ID": "lister"}, {"X-Tenant-ID": "lister-other"}
    for i in range(5):
        await create_queue(http, f"w{i}", mine)
        await publish(http, f"w{i}", working_at(f"2020-01-01T00:00:0{i}Z"), headers=mine)
    await create_queue(http, "done", mine)
    await publish(
        http, "done",
        {"event_type": "complete", "result": {"n": 1}, "timestamp": "2020-01-02T00:00:00Z"},
        headers=mine,
    )
    await create_queue(http, "fresh", mine)
    # The other tenant: a task of the same name as one of ours, and one newer than all of ours.
    for task, at in (("w0", "2020-01-01T00:00:00Z"), ("secret", "2030-01-01T00:00:00Z")):
        await create_queue(http, task, theirs)
        await publish(http, task, working_at(at), headers=theirs)
    client = await client_for_tenant(http, "lister")
    other = await client_for_tenant(http, "lister-other")

    # Paging: newest status first; a task created during the walk sorts first, so the pages
    # after the token neither repeat nor skip anything.
    async def create_late(pages):
        if pages == 1:
            await create_queue(http, "late", mine)
            await publish(http, "late", working_at("2021-01-01T00:00:00Z"), headers=mine)

    ids, pages, totals = await walk(client, 3, between_pages=create_late)
    eq(ids, ["fresh", "done", "w4", "w3", "w2", "w1", "w0"], "ListTasks: pages in order")
    eq(pages, 3, "ListTasks: pages of 3")
    eq(totals, [7, 8, 8], "ListTasks: totalSize counts every match")
    ids, pages, _ = await walk(client, 2)
    eq(ids, ["fresh", "late", "done", "w4", "w3", "w2", "w1", "w0"], "ListTasks: all, again")
    eq(pages, 4, "ListTasks: pages of 2")

    # Filters.
    working = await client.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_WORKING))
    eq([t.id for t in working.tasks], ["late", "w4", "w3", "w2", "w1", "w0"], "status filter")
    check(all(TaskState.Name(t.status.state) == "TASK_STATE_WORKING" for t in working.tasks),
          "status filter: states")
    ids, pages, _ = await walk(client, 4, status=TaskState.TASK_STATE_WORKING)
    eq((ids, pages), (["late", "w4", "w3", "w2", "w1", "w0"], 2), "status filter: paged")
    done = await client.list_tasks(
        ListTasksRequest(status=TaskState.TASK_STATE_COMPLETED, include_artifacts=True)
    )
    eq([t.id for t in done.tasks], ["done"], "status filter: completed")
    eq([data_of(p) for p in done.tasks[0].artifacts[0].parts], [{"n": 1}],
       "includeArtifacts: the result artifact")
    bare = await client.list_tasks(ListTasksRequest(context_id="done"))
    eq([t.id for t in bare.tasks], ["done"], "context filter")
    eq(len(bare.tasks[0].artifacts), 0, "without includeArtifacts: no artifacts")
    recent = await client.list_tasks(
        ListTasksRequest(status_timestamp_after=timestamp("2020-01-01T00:00:03Z"))
    )
    eq(sorted(t.id for t in recent.tasks), ["done", "fresh", "late", "w3", "w4"],
       "statusTimestampAfter (inclusive)")

    # Tenancy: each tenant sees its own tasks only, whatever it asks for.
    eq(list((await client.list_tasks(ListTasksRequest(context_id="secret"))).tasks), [],
       "another tenant's task is no context of ours")
    theirs_listed = await other.list_tasks(ListTasksRequest())
    eq([t.id for t in theirs_listed.tasks], ["secret", "w0"], "the other tenant's listing")
    check(all(t.metadata["tenant_id"] == "lister-other" for t in theirs_listed.tasks),
          "the other tenant's listing: its tenant")
    eq(theirs_listed.total_size, 2, "the other tenant's total")
    try:
        await client.list_tasks(ListTasksRequest(tenant="lister-other"))
        raise AssertionError("ListTasks naming another tenant succeeded")
    except InvalidParamsError:
        pass
    try:
        await client.list_tasks(ListTasksRequest(page_token="not-a-token"))
        raise AssertionError("ListTasks with a made-up page token succeeded")
    except InvalidParamsError:
        pass
    await client.close()
    await other.close()
    print("A2A 1.0 ListTasks: pages (stable while a task is created), status, context and "
          "time filters, includeArtifacts, tenancy, bad token: ok")


async def token_mode(token):
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=10.0, trust_env=False, headers=auth) as http:
        card = await A2ACardResolver(http, BASE).get_agent_card()
        check("bearer" in card.security_schemes, "token mode: the card declares a bearer scheme")
        eq(len(card.security_requirements), 1, "token mode: the card requires it")

        # Without credentials the endpoint refuses, as every other route does.
        bare = await create_client(card, ClientConfig())
        try:
            await bare.get_task(GetTaskRequest(id="anything"))
            raise AssertionError("GetTask without a token succeeded")
        except A2AClientError as e:
            check("401" in str(e), f"token mode: expected HTTP 401, got {e}")
        await bare.close()

        client = await create_client(
            card, ClientConfig(httpx_client=httpx.AsyncClient(headers=auth, trust_env=False))
        )
        job = "job-token"
        await create_queue(http, job)
        await publish(http, job, {"event_type": "status", "state": "working"})
        task = await client.get_task(GetTaskRequest(id=job))
        eq(TaskState.Name(task.status.state), "TASK_STATE_WORKING", "token mode: GetTask")
        eq(task.metadata["tenant_id"], "acme", "token mode: the token's tenant")
        received = []
        async for resp in client.subscribe(SubscribeToTaskRequest(id=job)):
            received.append(summarize(resp))
            if len(received) == 1:
                await publish(http, job, {"event_type": "complete", "result": {"ok": True}})
        eq([r[0] for r in received], ["task", "artifact", "status"], "token mode: stream")
        eq(received[-1][1], "TASK_STATE_COMPLETED", "token mode: completed")

        victim = "cancel-token"
        await create_queue(http, victim)
        task = await client.cancel_task(CancelTaskRequest(id=victim))
        check(task.metadata["cancel_requested"], "token mode: CancelTask")

        # ListTasks lists the token's tenant: never the other token's task.
        other_auth = {"Authorization": f"Bearer {ARGS.other_token}"}
        await create_queue(http, "job-other", other_auth)
        listed = await client.list_tasks(ListTasksRequest())
        eq(sorted(t.id for t in listed.tasks), ["cancel-token", "job-token"],
           "token mode: ListTasks")
        check(all(t.metadata["tenant_id"] == "acme" for t in listed.tasks),
              "token mode: ListTasks tenant")
        other = await create_client(
            card,
            ClientConfig(httpx_client=httpx.AsyncClient(headers=other_auth, trust_env=False)),
        )
        eq([t.id for t in (await other.list_tasks(ListTasksRequest())).tasks], ["job-other"],
           "token mode: the other tenant's ListTasks")
        await other.close()
        await client.close()
    print("A2A 1.0, token mode: card, refusal without a token, GetTask, SubscribeToTask, "
          "CancelTask, ListTasks per tenant: ok")


async def main():
    if ARGS.token:
        await token_mode(ARGS.token)
        return
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
        for version in ("1.0", "0.3"):
            await variant(http, version)
        await list_tasks(http)


asyncio.run(main())
