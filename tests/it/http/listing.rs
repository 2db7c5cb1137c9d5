//! `GET /events/queues` paged and filtered: walking every page returns every queue once, newest
//! activity first; the walk holds while queues change; `kind` / `state` / `task_id_prefix`
//! narrow pages and the plain list alike; bad limits and cursors are `400`; tenants stay apart
//! and an admin's list spans them. Activity times come from a manual clock, so ties (which the
//! tenant and task ids break) are certain rather than left to chance.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use eventqueue::server::ServerConfig;
use eventqueue::{Config, ManualClock, QueueManager, Timestamp};
use serde_json::{Value, json};

use super::app::{App, Reply, Req, token, token_config};
use super::complete;
use crate::helpers;

/// An app whose manager runs on a manual clock.
async fn app_with_clock(config: ServerConfig) -> (App, Arc<ManualClock>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
        1_800_000_000_000_000,
    )));
    let manager = QueueManager::open_with_clock(Config::new(dir.path()), clock.clone())
        .await
        .unwrap();
    (App::over(manager, dir, config), clock)
}

/// A request as tenant `tenant` in open mode, or with the token `tenant` when it has dots
/// (a JWT).
fn req(who: &str, method: &str, uri: &str) -> Req {
    let r = Req::new(method, uri);
    if who.contains('.') {
        r.bearer(who)
    } else {
        r.header("x-tenant-id", who)
    }
}

async fn call(app: &App, who: &str, method: &str, uri: &str, body: Option<Value>) -> Reply {
    let mut r = req(who, method, uri);
    if let Some(b) = body {
        r = r.body(b.to_string());
    }
    app.send(&r).await
}

async fn create(app: &App, who: &str, task: &str, kind: &str) {
    let r = call(
        app,
        who,
        "POST",
        "/events/queues",
        Some(json!({"task_id": task, "kind": kind})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
}

async fn post(app: &App, who: &str, uri: &str, body: Value) {
    let r = call(app, who, "POST", uri, Some(body)).await;
    assert!(r.status.is_success(), "{uri}: {}", r.json());
}

async fn enqueue(app: &App, who: &str, task: &str, event: Value) {
    post(app, who, &format!("/events/queues/{task}/events"), event).await;
}

fn progress() -> Value {
    json!({"event_type": "progress", "current": 1, "total": 2})
}

/// `(tenant, task)` of each queue info in `list`.
fn ids(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["tenant_id"].as_str().unwrap().to_string(),
                q["task_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn tasks(list: &Value) -> Vec<String> {
    ids(list).into_iter().map(|(_, task)| task).collect()
}

/// The queues of the plain list in the order pages must follow: `last_activity` descending
/// (its RFC 3339 text has a fixed width, so text order is time order), then tenant, task.
async fn expected_order(app: &App, who: &str, query: &str) -> Vec<(String, String)> {
    let r = call(app, who, "GET", &format!("/events/queues{query}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let mut all: Vec<(String, String, String)> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["last_activity"].as_str().unwrap().to_string(),
                q["tenant_id"].as_str().unwrap().to_string(),
                q["task_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| (&a.1, &a.2).cmp(&(&b.1, &b.2))));
    all.into_iter().map(|(_, t, q)| (t, q)).collect()
}

/// One page: its queues and next cursor.
async fn page(app: &App, who: &str, query: &str) -> (Value, Option<String>) {
    let r = call(app, who, "GET", &format!("/events/queues?{query}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.json());
    let body = r.json();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["next_cursor", "queues"], "the page's fields");
    let cursor = match &body["next_cursor"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("next_cursor must be a string or null, got {other}"),
    };
    (body["queues"].clone(), cursor)
}

/// Every page of `query` with `limit`: the pages' queues, in order, and their lengths.
async fn walk(
    app: &App,
    who: &str,
    query: &str,
    limit: usize,
) -> (Vec<(String, String)>, Vec<usize>) {
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor = String::new();
    loop {
        let (queues, next) =
            page(app, who, &format!("{query}&limit={limit}&cursor={cursor}")).await;
        sizes.push(queues.as_array().unwrap().len());
        seen.extend(ids(&queues));
        match next {
            Some(next) => cursor = next,
            None => return (seen, sizes),
        }
        assert!(sizes.len() <= 1000, "the walk does not end");
    }
}

#[tokio::test]
async fn pages_return_every_queue_once_newest_activity_first() {
    let (app, clock) = app_with_clock(helpers::server_config()).await;
    // 23 queues; every third is created at the same instant as the one before it, so the
    // tie-break by task id decides their order.
    for i in 0..23 {
        if i % 3 != 2 {
            clock.advance(Duration::from_secs(1));
        }
        create(&app, "acme", &format!("q-{i:02}"), "task").await;
    }
    // Events move some older queues to the front, two of them to the same instant.
    clock.advance(Duration::from_secs(1));
    enqueue(&app, "acme", "q-03", progress()).await;
    enqueue(&app, "acme", "q-01", progress()).await;
    clock.advance(Duration::from_secs(1));
    enqueue(&app, "acme", "q-10", progress()).await;

    let want = expected_order(&app, "acme", "").await;
    assert_eq!(want.len(), 23);
    let head: Vec<&str> = want.iter().take(4).map(|(_, q)| q.as_str()).collect();
    assert_eq!(
        head,
        ["q-10", "q-01", "q-03", "q-22"],
        "newest activity first"
    );

    let (seen, sizes) = walk(&app, "acme", "x=1", 5).await;
    assert_eq!(seen, want, "every queue exactly once, in order");
    assert_eq!(sizes, [5, 5, 5, 5, 3]);
    // A page as long as the list has no next cursor; one shorter by one has.
    let (all, next) = page(&app, "acme", "limit=23").await;
    assert_eq!(ids(&all), want);
    assert_eq!(next, None);
    let (first, next) = page(&app, "acme", "limit=22").await;
    assert_eq!(first.as_array().unwrap().len(), 22);
    let (rest, next) = page(&app, "acme", &format!("limit=22&cursor={}", next.unwrap())).await;
    assert_eq!(ids(&rest), want[22..]);
    assert_eq!(next, None);
    // Without `limit`, a cursor pages with the default size; `cursor=` alone is the first page.
    let (first, _) = page(&app, "acme", "cursor=").await;
    assert_eq!(ids(&first), want);
    // The queue info of a page is the full info.
    assert_eq!(first[0]["latest_offset"], 1);
    assert_eq!(first[0]["kind"], "task");
}

#[tokio::test]
async fn a_walk_holds_while_queues_change() {
    let (app, clock) = app_with_clock(helpers::server_config()).await;
    for i in 0..20 {
        clock.advance(Duration::from_secs(1));
        create(&app, "acme", &format!("q-{i:02}"), "task").await;
    }
    let before = expected_order(&app, "acme", "").await;
    let (first, cursor) = page(&app, "acme", "limit=6").await;
    let mut seen = ids(&first);
    assert_eq!(seen, before[..6]);
    // While the walk is between pages: a served queue becomes active (it moves to the front,
    // behind the cursor), an unserved one is deleted, an unserved one becomes active (it moves
    // ahead of the cursor), and a new queue appears (at the front).
    let served_active = before[2].1.clone();
    let deleted = before[9].1.clone();
    let unserved_active = before[12].1.clone();
    clock.advance(Duration::from_secs(1));
    enqueue(&app, "acme", &served_active, progress()).await;
    let r = call(
        &app,
        "acme",
        "DELETE",
        &format!("/events/queues/{deleted}"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    clock.advance(Duration::from_secs(1));
    enqueue(&app, "acme", &unserved_active, progress()).await;
    clock.advance(Duration::from_secs(1));
    create(&app, "acme", "q-new", "task").await;

    let mut cursor = cursor.expect("more pages");
    loop {
        let (queues, next) = page(&app, "acme", &format!("limit=6&cursor={cursor}")).await;
        seen.extend(ids(&queues));
        match next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no queue twice: {seen:?}");
    let changed = [&served_active, &deleted, &unserved_active];
    let unchanged: Vec<_> = before
        .iter()
        .filter(|(_, q)| !changed.contains(&q))
        .collect();
    let seen_unchanged: Vec<_> = seen
        .iter()
        .filter(|(_, q)| !changed.contains(&q) && q != "q-new")
        .collect();
    assert_eq!(
        seen_unchanged, unchanged,
        "every unchanged queue once, in order"
    );
    assert!(!seen.iter().any(|(_, q)| *q == deleted), "a deleted queue");
    // The next walk starts with what became active, newest first.
    let (fresh, _) = page(&app, "acme", "limit=3").await;
    assert_eq!(tasks(&fresh), ["q-new", &unserved_active, &served_active]);
}

#[tokio::test]
async fn filters_narrow_pages_and_the_plain_list() {
    let (app, clock) = app_with_clock(helpers::server_config()).await;
    for (task, kind) in [
        ("wf-run", "workflow"),
        ("wf-done", "workflow"),
        ("in-closed", "ingestion"),
        ("in-cancel", "ingestion"),
        ("job-cancelled", "task"),
        ("job-run", "task"),
    ] {
        clock.advance(Duration::from_secs(1));
        create(&app, "acme", task, kind).await;
    }
    enqueue(&app, "acme", "wf-done", complete()).await;
    post(&app, "acme", "/events/queues/in-closed/close", json!({})).await;
    post(
        &app,
        "acme",
        "/events/workflows/in-cancel/cancel",
        json!({}),
    )
    .await;
    // Cancelled, then the producer acknowledged it: still `cancelled`.
    post(
        &app,
        "acme",
        "/events/workflows/job-cancelled/cancel",
        json!({}),
    )
    .await;
    enqueue(
        &app,
        "acme",
        "job-cancelled",
        json!({"event_type": "status", "state": "cancelled"}),
    )
    .await;
    // Another tenant's queues never show.
    create(&app, "globex", "wf-other", "workflow").await;

    let cases: [(&str, &[&str]); 12] = [
        ("kind=workflow", &["wf-done", "wf-run"]),
        ("kind=task", &["job-cancelled", "job-run"]),
        (
            "kind=workflow,ingestion",
            &["in-cancel", "in-closed", "wf-done", "wf-run"],
        ),
        ("state=running", &["job-run", "wf-run"]),
        ("state=finished", &["wf-done"]),
        ("state=closed", &["in-closed"]),
        ("state=cancelled", &["in-cancel", "job-cancelled"]),
        ("state=finished,closed", &["in-closed", "wf-done"]),
        ("task_id_prefix=wf-", &["wf-done", "wf-run"]),
        ("task_id_prefix=job-&state=running", &["job-run"]),
        ("kind=ingestion&state=running", &[]),
        ("task_id_prefix=nothing", &[]),
    ];
    for (query, want) in cases {
        // Pages, two at a time, in activity order.
        let (seen, _) = walk(&app, "acme", query, 2).await;
        let mut got: Vec<String> = seen.into_iter().map(|(_, q)| q).collect();
        let order = expected_order(&app, "acme", &format!("?{query}")).await;
        let order: Vec<String> = order.into_iter().map(|(_, q)| q).collect();
        assert_eq!(got, order, "{query}: pages in activity order");
        got.sort();
        assert_eq!(got, want, "{query}: paged");
        // The plain list (no limit, no cursor) filters the same, and stays an array.
        let r = call(
            &app,
            "acme",
            "GET",
            &format!("/events/queues?{query}"),
            None,
        )
        .await;
        assert_eq!(tasks(&r.json()), want, "{query}: plain list");
    }
    // Empty items of a list are skipped; `kind=` alone filters nothing.
    let (all, _) = page(&app, "acme", "kind=&state=,&limit=10").await;
    assert_eq!(all.as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn bad_limits_cursors_and_filters_are_400_naming_the_parameter() {
    let app = App::open_mode().await;
    create(&app, "acme", "wf-1", "workflow").await;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let bad = [
        ("limit=0".to_string(), "limit"),
        ("limit=1001".into(), "limit"),
        ("limit=-1".into(), "limit"),
        ("limit=ten".into(), "limit"),
        ("limit=".into(), "limit"),
        ("cursor=zz".into(), "cursor"),
        ("cursor=31".into(), "cursor"),
        (format!("cursor={}", hex("1~seven~acme~wf-1")), "cursor"),
        (format!("cursor={}", hex("1~7~acme~../x")), "cursor"),
        (format!("limit=5&cursor={}", hex("9~7~acme~wf-1")), "cursor"),
        ("kind=pipeline".into(), "kind"),
        ("kind=workflow,Workflow&limit=5".into(), "kind"),
        ("state=done".into(), "state"),
        ("state=running,completed&limit=5".into(), "state"),
    ];
    for (query, field) in bad {
        let r = call(
            &app,
            "acme",
            "GET",
            &format!("/events/queues?{query}"),
            None,
        )
        .await;
        r.assert_error(StatusCode::BAD_REQUEST, &format!("{field}:"));
    }
    // The bounds themselves are fine.
    let (_, next) = page(&app, "acme", "limit=1").await;
    assert_eq!(next, None);
    let r = call(&app, "acme", "GET", "/events/queues?limit=1000", None).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn pages_keep_tenants_apart_and_an_admin_sees_every_tenant() {
    let (app, clock) = app_with_clock(token_config()).await;
    let acme = token("acme", "subscribe publish");
    let globex = token("globex", "subscribe publish");
    let admin = token("ops", "subscribe admin");
    // Pairs created at the same instant: the tenant id breaks the tie in the admin's list.
    for i in 0..5 {
        clock.advance(Duration::from_secs(1));
        create(&app, &acme, &format!("a-{i}"), "task").await;
        if i < 4 {
            create(&app, &globex, &format!("g-{i}"), "task").await;
        }
    }
    let (seen, _) = walk(&app, &acme, "x=1", 2).await;
    assert_eq!(
        seen.iter()
            .map(|(t, q)| format!("{t}/{q}"))
            .collect::<Vec<_>>(),
        ["acme/a-4", "acme/a-3", "acme/a-2", "acme/a-1", "acme/a-0"]
    );
    let (seen, _) = walk(&app, &globex, "x=1", 3).await;
    assert!(seen.iter().all(|(t, _)| t == "globex"), "{seen:?}");
    assert_eq!(seen.len(), 4);

    // An admin without ?tenant_id= pages through every tenant's queues.
    let want = expected_order(&app, &admin, "").await;
    assert_eq!(want.len(), 9);
    assert_eq!(
        want[1..3],
        [
            ("acme".to_string(), "a-3".to_string()),
            ("globex".to_string(), "g-3".to_string())
        ]
    );
    let (seen, sizes) = walk(&app, &admin, "x=1", 4).await;
    assert_eq!(seen, want);
    assert_eq!(sizes, [4, 4, 1]);
    // With ?tenant_id= one tenant's.
    let (seen, _) = walk(&app, &admin, "tenant_id=globex", 3).await;
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|(t, _)| t == "globex"), "{seen:?}");

    // A cursor from another tenant's list positions globex's walk; it shows nothing of acme.
    let (_, acme_cursor) = page(&app, &acme, "limit=2").await;
    let (rest, _) = page(
        &app,
        &globex,
        &format!("limit=10&cursor={}", acme_cursor.unwrap()),
    )
    .await;
    assert_eq!(tasks(&rest), ["g-3", "g-2", "g-1", "g-0"]);
    // A token without `subscribe` cannot list.
    let publisher = token("acme", "publish");
    let r = call(&app, &publisher, "GET", "/events/queues?limit=5", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}
