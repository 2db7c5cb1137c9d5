//! `ListTasks` (A2A 1.0): the caller's tasks, most recently updated first, a page at a time.
//!
//! # Order and page tokens
//!
//! Tasks are sorted as the specification asks, by status timestamp, newest first; ties by task
//! id, descending. A page token holds the sort key (status timestamp, task id) of the last task
//! of the page it follows, not a position, and the next page is every matching task after that
//! key. So tasks created or updated while a client pages (which sort first, their status being
//! newer) shift nothing: the pages after a token neither repeat a task nor skip one whose
//! status did not change. A task updated mid-walk moves ahead of the token and is not seen
//! again by that walk; a new listing shows it first. Tokens are opaque to clients (hex text
//! with a format version) and stay valid however long a client waits between pages.
//!
//! # Cost
//!
//! Sorting and the filters need every task's status, so a listing reads the status of each of
//! the tenant's queues (a `contextId` filter narrows that to one: a task's context is the task
//! itself). The status is the one the task's last status-changing event sets — every event but
//! an artifact sets one, from that event alone — so it is read from the end of the queue: a
//! few events, and the whole retained log only behind a long run of artifacts. The full task
//! (artifacts included) is read only for the tasks of the page, and only when asked for.

use std::sync::Arc;

use futures_util::{StreamExt, stream};
use serde_json::{Map, Value, json};

use super::mapping::{A2aState, Mapper, TaskView, Version, task_json};
use super::rpc::{INVALID_PARAMS, RpcError, RpcRequest, Snapshot, check_tenant, success};
use crate::server::AppState;
use crate::server::tenant::Caller;
use crate::{Delivery, Error, EventQueue, EventType, RecordedEvent, TaskId, Timestamp};

/// Tasks per page when the request does not say (the specification's default).
const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page a request may ask for (the specification's maximum).
const MAX_PAGE_SIZE: usize = 100;
/// Events read first from a queue's end for its status. The last event nearly always sets the
/// status; only a longer run of trailing artifacts needs a read of the whole retained log.
const TAIL: u64 = 16;
/// Queues whose status is read at once: enough to keep the blocking pool's reads overlapping,
/// few enough that one listing does not crowd out every other reader.
const SCANS: usize = 8;
/// The page token's format version, its first field.
const TOKEN_VERSION: &str = "1";

/// The position of a task in the listing order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    timestamp: Timestamp,
    task: TaskId,
}

impl SortKey {
    /// The page token that continues after this key.
    fn token(&self) -> String {
        let text = format!(
            "{TOKEN_VERSION}.{}.{}",
            self.timestamp.as_micros(),
            self.task
        );
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a page token; `None` when it is not one that [`SortKey::token`] made.
    fn from_token(token: &str) -> Option<Self> {
        // A token is at most a few hundred characters; anything far longer is not one.
        if !token.len().is_multiple_of(2) || token.len() > 1024 || !token.is_ascii() {
            return None;
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut fields = text.splitn(3, '.');
        if fields.next()? != TOKEN_VERSION {
            return None;
        }
        let micros: i64 = fields.next()?.parse().ok()?;
        let task = TaskId::new(fields.next()?).ok()?;
        Some(Self {
            timestamp: Timestamp::from_micros(micros),
            task,
        })
    }
}

/// The `status` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateFilter {
    /// No filter (absent, or `TASK_STATE_UNSPECIFIED`).
    Any,
    Is(A2aState),
    /// A valid state none of our tasks can be in (`REJECTED`, `AUTH_REQUIRED`): matches nothing.
    Unreachable,
}

impl StateFilter {
    fn parse(value: &Value) -> Option<Self> {
        const UNREACHABLE: [(&str, i64); 2] =
            [("TASK_STATE_REJECTED", 7), ("TASK_STATE_AUTH_REQUIRED", 8)];
        let known = |name: &str, number: i64| match value {
            Value::String(s) => s == name,
            Value::Number(n) => n.as_i64() == Some(number),
            _ => false,
        };
        if known("TASK_STATE_UNSPECIFIED", 0) {
            return Some(Self::Any);
        }
        if let Some(state) = A2aState::ALL
            .into_iter()
            .find(|s| known(s.name(Version::V1), s.number()))
        {
            return Some(Self::Is(state));
        }
        UNREACHABLE
            .iter()
            .any(|&(name, number)| known(name, number))
            .then_some(Self::Unreachable)
    }

    fn admits(self, state: A2aState) -> bool {
        match self {
            Self::Any => true,
            Self::Is(wanted) => wanted == state,
            Self::Unreachable => false,
        }
    }
}

/// The parameters of a `ListTasks` request, validated.
#[derive(Debug)]
struct ListParams {
    context: Option<String>,
    state: StateFilter,
    page_size: usize,
    after: Option<SortKey>,
    status_after: Option<Timestamp>,
    include_artifacts: bool,
}

/// A parameter by its JSON name or its proto field name (proto JSON accepts both); `null` is
/// absent.
fn field<'a>(params: &'a Map<String, Value>, json: &str, proto: &str) -> Option<&'a Value> {
    params
        .get(json)
        .or_else(|| params.get(proto))
        .filter(|v| !v.is_null())
}

/// An integer, as a JSON number or (proto JSON's form of 64-bit integers) a decimal string.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl ListParams {
    fn parse(req: &RpcRequest, caller: &Caller) -> Result<Self, RpcError> {
        let id = req.reply_id();
        let invalid = |msg: &str| RpcError::new(&id, INVALID_PARAMS, msg);
        let empty = Map::new();
        let params = match &req.params {
            Value::Null => &empty,
            Value::Object(params) => params,
            _ => return Err(invalid("params: must be an object")),
        };
        check_tenant(params, caller, &id)?;
        let context = match field(params, "contextId", "context_id") {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("params.contextId: must be a string")),
        };
        let state = match field(params, "status", "status") {
            None => StateFilter::Any,
            Some(value) => StateFilter::parse(value).ok_or_else(|| {
                invalid(
                    "params.status: must be a TaskState such as \"TASK_STATE_WORKING\" (or its \
                     number)",
                )
            })?,
        };
        let page_size = match field(params, "pageSize", "page_size") {
            None => DEFAULT_PAGE_SIZE,
            Some(value) => integer(value)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| invalid("params.pageSize: must be an integer from 1 to 100"))?,
        };
        let after = match field(params, "pageToken", "page_token") {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(SortKey::from_token(s).ok_or_else(|| {
                invalid(
                    "params.pageToken: not a page token of this server (pass the previous \
                     answer's nextPageToken unchanged, or leave it out for the first page)",
                )
            })?),
            Some(_) => return Err(invalid("params.pageToken: must be a string")),
        };
        // Our tasks carry no message history, so any length is met by leaving it out; a
        // negative one is still a malformed request.
        if let Some(value) = field(params, "historyLength", "history_length")
            && integer(value).is_none_or(|n| n < 0)
        {
            return Err(invalid(
                "params.historyLength: must be a non-negative integer",
            ));
        }
        let status_after = match field(params, "statusTimestampAfter", "status_timestamp_after") {
            None => None,
            Some(Value::String(s)) => Some(Timestamp::parse_rfc3339(s).map_err(|_| {
                invalid(
                    "params.statusTimestampAfter: must be an RFC 3339 timestamp such as \
                     \"2026-11-28T02:31:45Z\"",
                )
            })?),
            Some(_) => {
                return Err(invalid(
                    "params.statusTimestampAfter: must be an RFC 3339 timestamp string",
                ));
            }
        };
        let include_artifacts = match field(params, "includeArtifacts", "include_artifacts") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("params.includeArtifacts: must be true or false")),
        };
        Ok(Self {
            context,
            state,
            page_size,
            after,
            status_after,
            include_artifacts,
        })
    }

    fn admits(&self, view: &TaskView) -> bool {
        self.state.admits(view.state())
            && self
                .status_after
                .is_none_or(|after| view.status_timestamp() >= after)
    }
}

/// A task of the listing: its queue, and the task as its latest status leaves it.
struct Row {
    key: SortKey,
    queue: EventQueue,
    view: TaskView,
}

/// `ListTasks`.
pub(super) async fn list_tasks(
    state: &AppState,
    caller: &Caller,
    req: &RpcRequest,
) -> Result<axum::response::Response, RpcError> {
    let id = req.reply_id();
    let params = ListParams::parse(req, caller)?;
    let manager = state.manager();
    let queues: Vec<EventQueue> = match &params.context {
        // A task's context is the task: at most one matches, and a context that is not a
        // valid task id matches none.
        Some(context) => TaskId::new(context)
            .ok()
            .and_then(|task| manager.get_queue(&caller.tenant, &task))
            .into_iter()
            .collect(),
        None => manager
            .list_queues(Some(&caller.tenant))
            .into_iter()
            .filter_map(|info| manager.get_queue(&caller.tenant, &info.task_id))
            .collect(),
    };
    let scanned: Vec<(EventQueue, crate::Result<TaskView>)> = stream::iter(queues)
        .map(|queue| async move {
            let view = latest_status(&queue).await;
            (queue, view)
        })
        .buffer_unordered(SCANS)
        .collect()
        .await;
    let mut rows = Vec::with_capacity(scanned.len());
    for (queue, view) in scanned {
        let view = match view {
            Ok(view) => view,
            // Deleted or expired while listing: no longer a task.
            Err(Error::QueueNotFound { .. }) => continue,
            Err(e) => return Err(RpcError::internal(&id, &e)),
        };
        if params.admits(&view) {
            let key = SortKey {
                timestamp: view.status_timestamp(),
                task: queue.task_id().clone(),
            };
            rows.push(Row { key, queue, view });
        }
    }
    rows.sort_unstable_by(|a, b| b.key.cmp(&a.key));
    let total = rows.len();
    let start = params
        .after
        .as_ref()
        .map_or(0, |after| rows.partition_point(|row| row.key >= *after));
    let end = total.min(start + params.page_size);
    let next_page_token = if end < total {
        rows[end - 1].key.token()
    } else {
        String::new()
    };
    let page = rows.drain(start..end);
    let tasks: Vec<Value> = if params.include_artifacts {
        stream::iter(page)
            .map(|row| full_task(row, &id))
            .buffered(SCANS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<_, _>>()?
    } else {
        page.map(|row| {
            let mut task = task_json(&row.view, &row.queue, Version::V1);
            // The specification: without includeArtifacts the field is left out, not empty.
            if let Value::Object(task) = &mut task {
                task.remove("artifacts");
            }
            task
        })
        .collect()
    };
    Ok(success(
        &id,
        json!({
            "tasks": tasks,
            "nextPageToken": next_page_token,
            "pageSize": params.page_size,
            "totalSize": total,
        }),
    ))
}

/// The whole task, artifacts included, read up to the offset its listed status reflects (so
/// its status is the one it was sorted by). `None` when the queue is gone by now.
async fn full_task(row: Row, id: &Value) -> Result<Option<Value>, RpcError> {
    let sub = match row.queue.subscribe(row.queue.first_offset()) {
        Ok(sub) => sub,
        Err(Error::QueueNotFound { .. }) => return Ok(None),
        Err(e) => return Err(RpcError::internal(id, &e)),
    };
    let snapshot = Snapshot::read(&row.queue, sub, row.view.offset)
        .await
        .map_err(|e| RpcError::internal(id, &e))?;
    Ok(Some(task_json(&snapshot.view, &row.queue, Version::V1)))
}

/// The task as its last status-changing retained event leaves it: the status `GetTask`
/// answers, read from the queue's end rather than its start. Events after a terminal event are
/// not part of the task (streams end there), as in `GetTask`.
async fn latest_status(queue: &EventQueue) -> crate::Result<TaskView> {
    let info = queue.info();
    // `finished_at` is read after the latest offset: a terminal event committed in between
    // lies at or past that offset and changes nothing below it.
    let upto = queue
        .finished_at()
        .map_or(info.latest_offset, |f| info.latest_offset.min(f + 1))
        .max(info.first_offset);
    let mut view = TaskView::new(queue);
    let tail = upto.saturating_sub(TAIL).max(info.first_offset);
    let mut last = last_status_event(queue, tail, upto).await?;
    if last.is_none() {
        last = last_status_event(queue, info.first_offset, tail).await?;
    }
    if let Some(ev) = last {
        for update in Mapper::default().map(&ev.event()?, ev.offset()) {
            view.apply(&update);
        }
    }
    view.offset = upto;
    Ok(view)
}

/// The last event in `from..upto` that is not an artifact (an artifact sets no status).
async fn last_status_event(
    queue: &EventQueue,
    from: u64,
    upto: u64,
) -> crate::Result<Option<Arc<RecordedEvent>>> {
    if from >= upto {
        return Ok(None);
    }
    let mut sub = queue.subscribe(from)?;
    let mut last = None;
    // Every offset below `upto` was published when it was read, so the subscription delivers
    // them (or the gap retention left) without waiting; it never waits past `upto` because
    // the loop stops at the event before it.
    while let Some(delivery) = sub.next().await {
        let Delivery::Event(ev) = delivery? else {
            continue;
        };
        if ev.offset() >= upto {
            break;
        }
        let at_end = ev.offset() + 1 >= upto;
        if ev.event_type() != EventType::Artifact {
            last = Some(ev);
        }
        if at_end {
            break;
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_anything_else() {
        let key = SortKey {
            timestamp: Timestamp::from_micros(1_767_225_600_123_456),
            task: TaskId::new("job.7:a@b-c").unwrap(),
        };
        let token = key.token();
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        assert_eq!(SortKey::from_token(&token), Some(key));
        let early = SortKey {
            timestamp: Timestamp::from_micros(-5),
            task: TaskId::new("t").unwrap(),
        };
        assert_eq!(SortKey::from_token(&early.token()), Some(early));
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        for bad in [
            "zz".to_string(),
            "abc".to_string(),
            "éé".to_string(),
            hex("2.5.t"),
            hex("1.x.t"),
            hex("1.5"),
            hex("1.5.bad id"),
            "a".repeat(2000),
        ] {
            assert_eq!(SortKey::from_token(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_status_filter_takes_names_and_numbers() {
        for state in A2aState::ALL {
            assert_eq!(
                StateFilter::parse(&json!(state.name(Version::V1))),
                Some(StateFilter::Is(state))
            );
            assert_eq!(
                StateFilter::parse(&json!(state.number())),
                Some(StateFilter::Is(state))
            );
        }
        assert_eq!(
            StateFilter::parse(&json!("TASK_STATE_UNSPECIFIED")),
            Some(StateFilter::Any)
        );
        assert_eq!(
            StateFilter::parse(&json!(7)),
            Some(StateFilter::Unreachable)
        );
        for bad in [json!("working"), json!(9), json!(true), json!(-1)] {
            assert_eq!(StateFilter::parse(&bad), None, "{bad}");
        }
    }
}
