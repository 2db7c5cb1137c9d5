//! Listing queues a page at a time: [`QueueFilter`], [`RunState`], [`ListCursor`] and
//! [`QueuePage`], used by [`crate::QueueManager::list_queues_page`].
//!
//! # Order
//!
//! Newest activity first: by `last_activity` descending, then tenant id and task id ascending
//! (the tie-break makes the order total, so equal activity times never reorder between pages).
//!
//! # Cursors
//!
//! A page ends with a [`ListCursor`] when more queues match. The cursor holds the *sort key*
//! of the page's last queue — its last activity time, tenant id and task id — not a position,
//! so the next page is "every matching queue after that key", however many queues were
//! created, deleted or active in between. Within one walk from the first page to the last:
//!
//! - a queue whose activity does not change while the walk runs is returned exactly once;
//! - no queue is returned twice (activity only moves a queue towards the front, before the
//!   cursor);
//! - a queue that becomes active while the walk runs moves to the front: the walk skips it if
//!   it had not reached it yet, and the next walk starts with it.
//!
//! The text form ([`ListCursor::encode`]) is opaque to clients: they hand it back unchanged.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::QueueState;
use crate::event::Timestamp;
use crate::ids::{TaskId, TenantId};
use crate::queue::{QueueInfo, QueueKind};

/// Page size when a client asks for a page without saying how long.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Longest page: one reply stays small however many queues a tenant has.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Where a queue's task stands, from the flags of its info (`is_cancelled`, `is_finished`,
/// `is_closed`). Every queue is in exactly one state, so filtering by a set of states
/// partitions the list; the first that applies, in this order, wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Cancellation was requested (`is_cancelled`), whether or not the task has stopped yet.
    Cancelled,
    /// A terminal event was enqueued (`is_finished`) without a cancellation.
    Finished,
    /// Closed to producers (`is_closed`) before any terminal event.
    Closed,
    /// None of the above: the task may still send events.
    Running,
}

impl RunState {
    /// Every state, in the order they are checked.
    pub const ALL: [RunState; 4] = [
        RunState::Cancelled,
        RunState::Finished,
        RunState::Closed,
        RunState::Running,
    ];

    /// The state of a queue with these flags.
    pub fn of(is_cancelled: bool, is_finished: bool, is_closed: bool) -> Self {
        if is_cancelled {
            RunState::Cancelled
        } else if is_finished {
            RunState::Finished
        } else if is_closed {
            RunState::Closed
        } else {
            RunState::Running
        }
    }

    /// The wire name: `cancelled`, `finished`, `closed`, `running`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Cancelled => "cancelled",
            RunState::Finished => "finished",
            RunState::Closed => "closed",
            RunState::Running => "running",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl QueueInfo {
    /// Where the queue's task stands (see [`RunState`]).
    pub fn run_state(&self) -> RunState {
        RunState::of(self.is_cancelled, self.is_finished, self.is_closed)
    }
}

/// Which queues a listing returns. The default matches every queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFilter {
    /// Only these kinds; empty: every kind.
    pub kinds: Vec<QueueKind>,
    /// Only these states; empty: every state.
    pub states: Vec<RunState>,
    /// Only task ids starting with this text; empty: every task id.
    pub task_id_prefix: String,
}

impl QueueFilter {
    /// Whether the queue of `info` passes the filter.
    pub fn matches(&self, info: &QueueInfo) -> bool {
        self.matches_identity(info.kind, &info.task_id) && self.matches_state(info.run_state())
    }

    /// The checks that need no lock: kind and task id.
    fn matches_identity(&self, kind: QueueKind, task: &TaskId) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind))
            && task.as_str().starts_with(&self.task_id_prefix)
    }

    fn matches_state(&self, state: RunState) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }
}

/// The sort key of a listing: newest activity first, then tenant and task ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SortKey {
    last_activity: Timestamp,
    tenant_id: TenantId,
    task_id: TaskId,
}

impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .last_activity
            .cmp(&self.last_activity)
            .then_with(|| self.tenant_id.cmp(&other.tenant_id))
            .then_with(|| self.task_id.cmp(&other.task_id))
    }
}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where the next page of a listing starts: after the queue with this sort key (see the
/// module docs). Any listing accepts any cursor — it is a point in the order, not a handle on
/// a server-side walk, so it never expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor(SortKey);

/// A text that is not a cursor [`ListCursor::encode`] made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor of a queue list")]
pub struct InvalidCursor;

/// Version tag of the cursor's text, so that a later format can tell old cursors apart.
const CURSOR_VERSION: &str = "1";
/// Separates the cursor's fields; not a character ids may hold.
const CURSOR_SEP: char = '~';

impl ListCursor {
    /// The cursor after the queue `task` of `tenant` whose last activity was `last_activity`.
    pub fn after(last_activity: Timestamp, tenant: TenantId, task: TaskId) -> Self {
        Self(SortKey {
            last_activity,
            tenant_id: tenant,
            task_id: task,
        })
    }

    /// The cursor after the queue of `info`.
    pub fn after_info(info: &QueueInfo) -> Self {
        Self::after(
            info.last_activity,
            info.tenant_id.clone(),
            info.task_id.clone(),
        )
    }

    /// The opaque text form: lowercase hex of `1~<micros>~<tenant>~<task>`, safe in a URL
    /// without escaping.
    pub fn encode(&self) -> String {
        let SortKey {
            last_activity,
            tenant_id,
            task_id,
        } = &self.0;
        let plain = format!(
            "{CURSOR_VERSION}{CURSOR_SEP}{}{CURSOR_SEP}{tenant_id}{CURSOR_SEP}{task_id}",
            last_activity.as_micros()
        );
        let mut out = String::with_capacity(plain.len() * 2);
        for b in plain.bytes() {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out
    }

    /// Parses [`encode`](Self::encode)'s text.
    ///
    /// # Errors
    ///
    /// [`InvalidCursor`] for any other text, including a cursor whose ids are not valid ids.
    pub fn decode(text: &str) -> Result<Self, InvalidCursor> {
        let hex = text.as_bytes();
        if !hex.len().is_multiple_of(2) {
            return Err(InvalidCursor);
        }
        let bytes = hex
            .chunks_exact(2)
            .map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
            .collect::<Option<Vec<u8>>>()
            .ok_or(InvalidCursor)?;
        let plain = String::from_utf8(bytes).map_err(|_| InvalidCursor)?;
        let mut fields = plain.split(CURSOR_SEP);
        let (Some(CURSOR_VERSION), Some(micros), Some(tenant), Some(task), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(InvalidCursor);
        };
        let micros: i64 = micros.parse().map_err(|_| InvalidCursor)?;
        let last_activity = Timestamp::from_micros(micros);
        if last_activity.as_micros() != micros {
            return Err(InvalidCursor);
        }
        Ok(Self::after(
            last_activity,
            TenantId::new(tenant).map_err(|_| InvalidCursor)?,
            TaskId::new(task).map_err(|_| InvalidCursor)?,
        ))
    }

    /// The last activity time of the queue the cursor follows.
    pub fn last_activity(&self) -> Timestamp {
        self.0.last_activity
    }

    /// The tenant of the queue the cursor follows.
    pub fn tenant_id(&self) -> &TenantId {
        &self.0.tenant_id
    }

    /// The task of the queue the cursor follows.
    pub fn task_id(&self) -> &TaskId {
        &self.0.task_id
    }
}

impl fmt::Display for ListCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// What page of a listing to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Which queues.
    pub filter: QueueFilter,
    /// Start after this queue; `None`: the first page.
    pub after: Option<ListCursor>,
    /// Most queues on the page, within `1..=`[`MAX_PAGE_SIZE`] (other values are clamped).
    pub limit: usize,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            filter: QueueFilter::default(),
            after: None,
            limit: DEFAULT_PAGE_SIZE,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePage {
    /// The page's queues, newest activity first.
    pub queues: Vec<QueueInfo>,
    /// Where the next page starts; `None` when no more queues matched.
    pub next_cursor: Option<ListCursor>,
}

/// A queue that made the page so far, ordered by its key alone.
struct Candidate {
    key: SortKey,
    queue: Arc<QueueState>,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The page `request` asks for among `queues`: one pass over them, keeping the `limit + 1`
/// first keys after the cursor in a heap (the extra one says whether more follow), then the
/// info of the page's queues only. The cursor of the next page is the key the queue was sorted
/// by, so a queue that became active between the pass and its info cannot be served twice.
pub(crate) fn page(queues: Vec<Arc<QueueState>>, request: &PageRequest) -> QueuePage {
    let limit = request.limit.clamp(1, MAX_PAGE_SIZE);
    let filter = &request.filter;
    let after = request.after.as_ref().map(|c| &c.0);
    let mut heap: BinaryHeap<Candidate> = BinaryHeap::with_capacity(limit + 1);
    for queue in queues {
        if !filter.matches_identity(queue.kind(), queue.task_id()) {
            continue;
        }
        let seen = queue.with_view(|v| {
            let state = RunState::of(v.cancel.is_some(), v.finished_at.is_some(), v.closed);
            (!v.removed).then_some((v.last_activity, state))
        });
        let Some((last_activity, state)) = seen else {
            continue;
        };
        if !filter.matches_state(state) {
            continue;
        }
        let key = SortKey {
            last_activity,
            tenant_id: queue.tenant_id().clone(),
            task_id: queue.task_id().clone(),
        };
        if after.is_some_and(|after| key <= *after) {
            continue;
        }
        if heap.len() <= limit {
            heap.push(Candidate { key, queue });
        } else if heap.peek().is_some_and(|worst| key < worst.key) {
            heap.pop();
            heap.push(Candidate { key, queue });
        }
    }
    let mut chosen = heap.into_sorted_vec();
    let more = chosen.len() > limit;
    chosen.truncate(limit);
    let next_cursor = if more {
        chosen.last().map(|c| ListCursor(c.key.clone()))
    } else {
        None
    };
    QueuePage {
        queues: chosen.iter().map(|c| QueueInfo::of(&c.queue)).collect(),
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(micros: i64, tenant: &str, task: &str) -> ListCursor {
        ListCursor::after(
            Timestamp::from_micros(micros),
            TenantId::new(tenant).unwrap(),
            TaskId::new(task).unwrap(),
        )
    }

    #[test]
    fn a_cursor_survives_its_text_form() {
        for c in [
            cursor(1_765_000_000_123_456, "acme", "wf-1"),
            cursor(0, "a", "b"),
            cursor(-5, "t.e_n:a@n-t", "x"),
        ] {
            let text = c.encode();
            assert!(text.bytes().all(|b| HEX.contains(&b)), "{text}");
            assert_eq!(ListCursor::decode(&text), Ok(c));
        }
    }

    #[test]
    fn anything_else_is_not_a_cursor() {
        let hex = |s: &str| {
            s.bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join("")
        };
        let good = cursor(7, "acme", "wf-1").encode();
        for bad in [
            String::new(),
            "zz".into(),
            good[1..].to_string(),
            good.to_uppercase(),
            format!("{good}00"),
            hex("2~7~acme~wf-1"),
            hex("1~seven~acme~wf-1"),
            hex("1~7~acme"),
            hex("1~7~acme~wf-1~more"),
            hex("1~7~acme~../x"),
            hex("1~7~~wf-1"),
            hex("1~999999999999999999~acme~wf-1"),
        ] {
            assert_eq!(ListCursor::decode(&bad), Err(InvalidCursor), "{bad:?}");
        }
    }

    #[test]
    fn keys_order_newest_activity_first_then_tenant_then_task() {
        let mut keys = [
            cursor(1, "a", "z"),
            cursor(2, "b", "a"),
            cursor(2, "a", "b"),
            cursor(2, "a", "a"),
            cursor(3, "z", "z"),
        ];
        keys.sort_by(|x, y| x.0.cmp(&y.0));
        let order: Vec<_> = keys
            .iter()
            .map(|c| {
                (
                    c.last_activity().as_micros(),
                    c.tenant_id().to_string(),
                    c.task_id().to_string(),
                )
            })
            .collect();
        assert_eq!(
            order,
            [
                (3, "z".into(), "z".into()),
                (2, "a".into(), "a".into()),
                (2, "a".into(), "b".into()),
                (2, "b".into(), "a".into()),
                (1, "a".into(), "z".into()),
            ]
        );
    }

    #[test]
    fn each_queue_is_in_exactly_one_state() {
        use RunState::*;
        let cases = [
            ((false, false, false), Running),
            ((false, false, true), Closed),
            ((false, true, false), Finished),
            ((false, true, true), Finished),
            ((true, false, false), Cancelled),
            ((true, true, false), Cancelled),
            ((true, false, true), Cancelled),
            ((true, true, true), Cancelled),
        ];
        for ((cancelled, finished, closed), want) in cases {
            assert_eq!(RunState::of(cancelled, finished, closed), want);
        }
        for state in RunState::ALL {
            assert_eq!(RunState::parse(state.as_str()), Some(state));
        }
        assert_eq!(RunState::parse("done"), None);
    }
}
