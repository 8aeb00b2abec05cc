//! The oracle test: the live stream, checked against Postgres itself.
//!
//! Four users write concurrently, through `POST /v1/batch` (inserts, updates that move annotations between works,
//! upserts, deletes, cascading work deletes) and directly in SQL as superuser (explicit owner_id; large
//! incompressible TOASTed `body`/`quote` later updated by `color` only or moved to another work without touching
//! them; transactions spanning several users; one ownership transfer; a bulk update; an `ALTER TABLE annotations
//! ADD COLUMN` mid-run, after which both writers set the new column).
//!
//! Each user has several subscribers with different filters on two connections (plus a third, late connection
//! for two users that subscribes while writes are in flight, once more later on the same socket). One connection
//! per user for two users disconnects twice (politely, then abruptly) and resumes every subscription with its
//! last offset on a new socket.
//!
//! At the end, after every user's final marker write has come back on every connection and the sockets have been
//! quiet for a second, for every subscription:
//! - the state built only from received frames equals what Postgres returns for that user and filter, each row
//!   rendered exactly as the snapshot path renders it (`column::text` + `convert::write_row`);
//! - no frame carried a row of another owner; no error frame arrived;
//! - replayed in order, every change is consistent with what the subscription had (an insert of a row it had, or
//!   an update or delete of one it did not have, is a duplicate or a gap), no `(xid, row id, op)` arrived in two
//!   frames (unless a `must_refetch` came between), and offsets strictly increase (likewise);
//! - on each user's steady connection (subscribed before any write), the `txn` xids are exactly the `txid`s of
//!   that user's batches that changed something, plus those of the SQL transactions that touched that user, each
//!   once.
//!
//! One equivalence is deliberate: a row a client received before the `ADD COLUMN` and that was never changed
//! afterwards does not carry the new column; for that column only, "absent" is compared as SQL NULL, which is
//! what Postgres stores for such rows of a column added without a default.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deeprecall_sync::live::convert;
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TestEnv, error_code, insert, op, statuses};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

const USERS: usize = 4;
/// Works every user has from the start and never deletes (subscriptions filter on them).
const BASE_WORKS: usize = 3;
const BATCH_ITERATIONS: usize = 45;
const SQL_ITERATIONS: usize = 70;
/// The column added mid-run.
const ADDED_COLUMN: &str = "rating";
const KINDS: [&str; 5] = ["highlight", "underline", "note", "rect", "ink"];
const COLORS: [Option<&str>; 4] = [None, Some("red"), Some("blue"), Some("yellow")];

/// A small deterministic generator (Knuth's MMIX LCG), so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    /// Random alphanumerics: pglz finds nothing to compress, so long values stay out of line (TOAST).
    fn text(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..len).map(|_| char::from(*self.pick(CHARS))).collect()
    }
}

#[derive(Debug, Clone)]
struct User {
    id: Uuid,
    /// The permanent works W0..W2.
    works: Vec<Uuid>,
}

/// One subscription: what the client asks, and the same filter written independently in SQL (the oracle's).
#[derive(Debug, Clone)]
struct SubSpec {
    id: String,
    table: &'static str,
    filter: Value,
    sql: String,
}

fn sub(id: &str, table: &'static str, filter: Value, sql: String) -> SubSpec {
    SubSpec {
        id: id.to_owned(),
        table,
        filter,
        sql,
    }
}

/// What a client connection does over the run.
#[derive(Debug, Clone)]
enum Plan {
    /// Subscribes before the writers start and reads to the end.
    Steady,
    /// Like `Steady`, but disconnects at these times after the writers started and resumes every subscription
    /// from its last offset on a new socket (the first time with a close frame, then abruptly).
    Resume(Vec<Duration>),
    /// Subscribes `subs` at `at` after the writers started (writes in flight), then `more` at `more_at` on the
    /// same socket.
    Late {
        at: Duration,
        more_at: Duration,
        more: Vec<SubSpec>,
    },
}

struct ClientRun {
    label: String,
    user: Uuid,
    subs: Vec<SubSpec>,
    plan: Plan,
}

/// Everything one logical client received, across its sockets.
struct ClientLog {
    label: String,
    user: Uuid,
    steady: bool,
    subs: Vec<SubSpec>,
    /// The plan it followed.
    plan: Plan,
    /// When (after the writers started) each disconnect or late subscription happened.
    events: Vec<Duration>,
    /// `(socket number, frame)` in arrival order.
    frames: Vec<(usize, Value)>,
    /// The state the harness's client built from the frames.
    state: BTreeMap<String, BTreeMap<String, Value>>,
    sockets: usize,
}

struct Shared {
    base: String,
    token: String,
    started: watch::Receiver<Option<Instant>>,
    marker: watch::Receiver<Option<String>>,
    ready: tokio::sync::mpsc::Sender<()>,
}

async fn subscribe_and_wait(client: &mut StreamClient, subs: &[SubSpec]) {
    for s in subs {
        client.subscribe(&s.id, s.table, s.filter.clone()).await;
    }
    // up_to_date frames may come in any order.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: HashSet<&str> = client
            .frames
            .iter()
            .filter(|f| f["type"] == "up_to_date")
            .filter_map(|f| f["id"].as_str())
            .collect();
        if subs.iter().all(|s| done.contains(s.id.as_str())) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            client.next(left).await.is_some(),
            "subscriptions not up to date in time (closed: {:?}); frames: {:?}",
            client.closed,
            client.frames
        );
    }
}

/// Reads at most one frame (waiting up to 50 ms), noting txn xids; panics if the server closed the socket.
async fn pump(client: &mut StreamClient, seen_xids: &mut HashSet<String>, label: &str) {
    if let Some(v) = client.next(Duration::from_millis(50)).await {
        if v["type"] == "txn" {
            seen_xids.insert(v["xid"].as_str().unwrap_or_default().to_owned());
        }
    } else if let Some(closed) = &client.closed {
        panic!("{label}: the server closed the stream unexpectedly: {closed:?}");
    }
}

fn take_frames(client: &mut StreamClient, socket: usize, log: &mut Vec<(usize, Value)>) {
    log.extend(
        std::mem::take(&mut client.frames)
            .into_iter()
            .map(|f| (socket, f)),
    );
}

async fn run_client(run: ClientRun, mut shared: Shared) -> ClientLog {
    let label = run.label.clone();
    let mut frames = Vec::new();
    let mut subs = run.subs.clone();
    let mut client = None;
    let mut socket = 0;
    if !matches!(run.plan, Plan::Late { .. }) {
        let mut c = StreamClient::connect(&shared.base, &shared.token).await;
        subscribe_and_wait(&mut c, &subs).await;
        socket = 1;
        client = Some(c);
    }
    // Ready: the writers start when every steady and resuming client is up to date.
    shared.ready.send(()).await.expect("ready");
    let started = *shared
        .started
        .wait_for(Option::is_some)
        .await
        .expect("start signal")
        .as_ref()
        .expect("set");
    let (mut disconnects, mut late) = match run.plan.clone() {
        Plan::Steady => (Vec::new(), None),
        Plan::Resume(times) => (times, None),
        Plan::Late { at, more_at, more } => (Vec::new(), Some((at, more_at, more, 0u8))),
    };
    disconnects.reverse();
    let mut seen_xids = HashSet::new();
    let mut events = Vec::new();
    let hard_stop = Instant::now() + Duration::from_secs(50);
    loop {
        assert!(
            Instant::now() < hard_stop,
            "{label}: the final marker never arrived"
        );
        let elapsed = started.elapsed();
        if let Some((at, more_at, more, step)) = &mut late {
            if *step == 0 && elapsed >= *at {
                // Subscribe while writes are in flight, without waiting: frames keep being read below.
                let mut c = StreamClient::connect(&shared.base, &shared.token).await;
                for s in &subs {
                    c.subscribe(&s.id, s.table, s.filter.clone()).await;
                }
                socket = 1;
                client = Some(c);
                events.push(started.elapsed());
                *step = 1;
            } else if *step == 1 && elapsed >= *more_at {
                let c = client.as_mut().expect("connected");
                for s in more.iter() {
                    c.subscribe(&s.id, s.table, s.filter.clone()).await;
                }
                subs.append(more);
                events.push(started.elapsed());
                *step = 2;
            }
        }
        if disconnects.last().is_some_and(|t| elapsed >= *t) {
            disconnects.pop();
            events.push(started.elapsed());
            let mut old = client.take().expect("connected");
            take_frames(&mut old, socket, &mut frames);
            let (state, offsets) = (old.state.clone(), old.offsets.clone());
            if disconnects.is_empty() {
                drop(old); // abrupt: no close frame
            } else {
                old.close().await;
            }
            // Writes go on while this client is away.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut c = StreamClient::connect(&shared.base, &shared.token).await;
            socket += 1;
            c.state = state;
            c.offsets = offsets.clone();
            for s in &subs {
                match offsets.get(&s.id) {
                    Some(offset) => c.resume(&s.id, s.table, s.filter.clone(), offset).await,
                    None => {
                        // Disconnected between a must_refetch and its snapshot: start over.
                        c.state.remove(&s.id);
                        c.subscribe(&s.id, s.table, s.filter.clone()).await;
                    }
                }
            }
            client = Some(c);
        }
        let Some(c) = client.as_mut() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let marker = shared.marker.borrow().clone();
        if let Some(marker) = marker
            && seen_xids.contains(&marker)
            && disconnects.is_empty()
            && late.as_ref().is_none_or(|l| l.3 == 2)
        {
            c.drain(Duration::from_secs(1)).await;
            if let Some(closed) = &c.closed {
                panic!("{label}: the server closed the stream unexpectedly: {closed:?}");
            }
            break;
        }
        pump(c, &mut seen_xids, &label).await;
    }
    let mut c = client.expect("connected");
    take_frames(&mut c, socket, &mut frames);
    let state = c.state.clone();
    c.close().await;
    ClientLog {
        label,
        user: run.user,
        steady: matches!(run.plan, Plan::Steady),
        subs,
        plan: run.plan,
        events,
        frames,
        state,
        sockets: socket,
    }
}

/// What a writer did, for the xid checks.
#[derive(Debug, Default)]
struct WriteLog {
    /// `(owner, txid)` of every committed transaction that changed a synced row of that owner.
    txids: Vec<(Uuid, String)>,
    batches_ok: usize,
    batches_failed: usize,
}

fn annotation_row(rng: &mut Lcg, id: Uuid, work: Uuid, altered: bool) -> Value {
    let mut row = json!({
        "id": id,
        "work_id": work,
        "kind": rng.pick(&KINDS),
        "color": rng.pick(&COLORS),
        "page": if rng.percent(20) { Value::Null } else { json!(1 + rng.below(300)) },
        "geometry": {"x": rng.below(1000), "y": rng.below(1000), "rects": [[0.5, 1.25], [2, 3]]},
        "style": {"opacity": 0.5, "label": rng.text(6)},
        "quote": format!("q \"{}\"\n\tü€", rng.text(20)),
        "tags": [rng.text(3), "two words", "quote\"d"],
    });
    if altered {
        row[ADDED_COLUMN] = json!(rng.below(6));
    }
    row
}

/// POSTs a batch, retrying (bounded) while the server has not yet learned about the added column.
async fn post_batch(env: &TestEnv, user: Uuid, ops: Value) -> (reqwest::StatusCode, Value) {
    let mut tries = 0;
    loop {
        let (status, body) = env.batch(user, ops.clone()).await;
        if error_code(&body) == "unknown_column" && tries < 8 {
            tries += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        return (status, body);
    }
}

/// One user's client-side writer: random batches through `/v1/batch`.
async fn batch_writer(
    env: Arc<TestEnv>,
    user: User,
    seed: u64,
    altered: Arc<AtomicBool>,
) -> WriteLog {
    let mut rng = Lcg::new(seed);
    let mut log = WriteLog::default();
    let mut annotations: Vec<Uuid> = Vec::new();
    let mut extra_works: Vec<Uuid> = Vec::new();
    for _ in 0..BATCH_ITERATIONS {
        let altered_now = altered.load(Ordering::Acquire);
        let mut works = user.works.clone();
        works.extend(&extra_works);
        let mut ops = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let roll = rng.below(100);
            let existing = (!annotations.is_empty()).then(|| *rng.pick(&annotations));
            match (roll, existing) {
                (0..=29, _) | (30..=64, None) => {
                    let id = Uuid::new_v4();
                    annotations.push(id);
                    let work = *rng.pick(&works);
                    ops.push(insert(
                        "annotations",
                        annotation_row(&mut rng, id, work, altered_now),
                    ));
                }
                (30..=44, Some(id)) => {
                    // Update: often the filter columns (work_id moves it between works, kind, color).
                    let mut row = json!({"id": id});
                    if rng.percent(50) {
                        row["work_id"] = json!(rng.pick(&user.works));
                    }
                    if rng.percent(40) {
                        row["kind"] = json!(rng.pick(&KINDS));
                    }
                    if rng.percent(50) || row.as_object().is_some_and(|o| o.len() == 1) {
                        row["color"] = json!(rng.pick(&COLORS));
                    }
                    if altered_now && rng.percent(50) {
                        row[ADDED_COLUMN] = json!(rng.below(6));
                    }
                    ops.push(op("update", "annotations", row));
                }
                (45..=54, Some(id)) => {
                    // Upsert of an existing row (an update), or of a new one.
                    let id = if rng.percent(30) {
                        let id = Uuid::new_v4();
                        annotations.push(id);
                        id
                    } else {
                        id
                    };
                    let work = *rng.pick(&user.works);
                    ops.push(op(
                        "upsert",
                        "annotations",
                        annotation_row(&mut rng, id, work, altered_now),
                    ));
                }
                (55..=64, Some(id)) => {
                    annotations.retain(|a| *a != id);
                    ops.push(op("delete", "annotations", json!({"id": id})));
                }
                (65..=77, _) => {
                    let id = Uuid::new_v4();
                    extra_works.push(id);
                    ops.push(insert(
                        "works",
                        json!({"id": id, "title": format!("Work {}", rng.text(8)), "year": 1990 + rng.below(40),
                               "tags": [rng.text(4)], "authors": [{"name": rng.text(7), "orcid": null}]}),
                    ));
                }
                (78..=89, _) => {
                    let id = *rng.pick(&works);
                    ops.push(op(
                        "update",
                        "works",
                        json!({"id": id, "title": format!("Renamed {}", rng.text(5)), "favorite": rng.percent(50),
                               "read_status": rng.pick(&["unread", "reading", "read"])}),
                    ));
                }
                (90..=94, _) if !extra_works.is_empty() => {
                    // Deleting a work cascades to its annotations: deletes the client never asked for.
                    let id = extra_works.remove(rng.below(extra_works.len()));
                    ops.push(op("delete", "works", json!({"id": id})));
                }
                _ => {
                    let id = *rng.pick(&works);
                    ops.push(op(
                        "upsert",
                        "works",
                        json!({"id": id, "title": format!("Upserted {}", rng.text(5)), "tags": ["x", rng.text(3)]}),
                    ));
                }
            }
        }
        let (status, body) = post_batch(&env, user.id, Value::Array(ops)).await;
        if status == 200 {
            log.batches_ok += 1;
            if statuses(&body).iter().any(|s| s == "applied") {
                let txid = body["txid"].as_str().expect("txid").to_owned();
                log.txids.push((user.id, txid));
            }
        } else {
            // A work deleted with its annotations in an earlier batch, a row lock conflict...: the batch rolled
            // back as a whole, nothing reaches the stream.
            log.batches_failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(15 + rng.below(50) as u64)).await;
    }
    log
}

/// The superuser writer: explicit owner_id, big TOASTed values, multi-user transactions, a transfer, a bulk
/// update and the `ALTER TABLE`.
async fn sql_writer(env: Arc<TestEnv>, users: Vec<User>, altered: Arc<AtomicBool>) -> WriteLog {
    let mut rng = Lcg::new(0x5EED);
    let mut db = env.superuser().await;
    let mut log = WriteLog::default();
    // Per user: the big annotations this writer owns (disjoint from the batch writers').
    let mut big: Vec<Vec<Uuid>> = vec![Vec::new(); users.len()];
    let mut transferred = false;
    for i in 0..SQL_ITERATIONS {
        if i == SQL_ITERATIONS * 2 / 5 {
            db.batch_execute(&format!(
                "alter table annotations add column {ADDED_COLUMN} integer"
            ))
            .await
            .expect("alter table");
            altered.store(true, Ordering::Release);
        }
        let altered_now = altered.load(Ordering::Acquire);
        let tx = db.transaction().await.expect("begin");
        let txid: String = tx
            .query_one("select pg_current_xact_id()::text", &[])
            .await
            .expect("txid")
            .get(0);
        let mut touched: HashSet<Uuid> = HashSet::new();
        // One to three users per transaction: a transaction spanning users must be split by owner.
        for _ in 0..1 + rng.below(3) {
            let u = rng.below(users.len());
            let user = &users[u];
            let roll = rng.below(100);
            let target = (!big[u].is_empty()).then(|| *rng.pick(&big[u]));
            let n = match (roll, target) {
                (0..=34, _) | (_, None) => {
                    let id = Uuid::new_v4();
                    big[u].push(id);
                    let len = 12_000 + rng.below(8_000);
                    let body = rng.text(len);
                    let quote = rng.text(10_000);
                    let rating = altered_now.then(|| rng.below(6) as i32);
                    let sql = if altered_now {
                        format!(
                            "insert into annotations (id, owner_id, work_id, kind, color, body, quote, tags, {ADDED_COLUMN})
                             values ($1, $2, $3, $4, $5, $6, $7, array['big', $8], $9)"
                        )
                    } else {
                        "insert into annotations (id, owner_id, work_id, kind, color, body, quote, tags)
                         values ($1, $2, $3, $4, $5, $6, $7, array['big', $8])"
                            .to_owned()
                    };
                    let kind = *rng.pick(&KINDS);
                    let color = *rng.pick(&COLORS);
                    let work = *rng.pick(&user.works);
                    let tag = rng.text(4);
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if altered_now {
                        vec![
                            &id, &user.id, &work, &kind, &color, &body, &quote, &tag, &rating,
                        ]
                    } else {
                        vec![&id, &user.id, &work, &kind, &color, &body, &quote, &tag]
                    };
                    tx.execute(&sql, &params).await.expect("big insert")
                }
                (35..=59, Some(id)) => {
                    // Only `color` changes: body and quote arrive as "unchanged TOAST" in the WAL.
                    let color = *rng.pick(&COLORS);
                    tx.execute(
                        "update annotations set color = $1 where owner_id = $2 and id = $3",
                        &[&color, &user.id, &id],
                    )
                    .await
                    .expect("color update")
                }
                (60..=74, Some(id)) => {
                    // The filter columns change, the TOASTed ones do not.
                    let work = *rng.pick(&user.works);
                    let kind = *rng.pick(&KINDS);
                    tx.execute(
                        "update annotations set work_id = $1, kind = $2 where owner_id = $3 and id = $4",
                        &[&work, &kind, &user.id, &id],
                    )
                    .await
                    .expect("move update")
                }
                (75..=82, Some(id)) if altered_now => {
                    let rating = rng.below(6) as i32;
                    tx.execute(
                        &format!(
                            "update annotations set {ADDED_COLUMN} = $1 where owner_id = $2 and id = $3"
                        ),
                        &[&rating, &user.id, &id],
                    )
                    .await
                    .expect("rating update")
                }
                (83..=89, Some(id)) => {
                    big[u].retain(|x| *x != id);
                    tx.execute(
                        "delete from annotations where owner_id = $1 and id = $2",
                        &[&user.id, &id],
                    )
                    .await
                    .expect("delete")
                }
                (90..=94, _) => {
                    // A bulk update over rows of both writers.
                    tx.execute(
                        "update annotations set page = coalesce(page, 0) + 1 where owner_id = $1 and work_id = $2",
                        &[&user.id, &user.works[2]],
                    )
                    .await
                    .expect("bulk update")
                }
                _ => {
                    let title = format!("SQL title {}", rng.text(6));
                    let work = *rng.pick(&user.works);
                    tx.execute(
                        "update works set title = $1, tags = array['sql', $1] where owner_id = $2 and id = $3",
                        &[&title, &user.id, &work],
                    )
                    .await
                    .expect("works update")
                }
            };
            if n > 0 {
                touched.insert(user.id);
            }
        }
        if !transferred && i == SQL_ITERATIONS * 3 / 5 && !big[0].is_empty() {
            // Ownership changes hands (only a superuser can): a delete for the old owner, an insert for the new.
            transferred = true;
            let id = big[0].remove(0);
            let n = tx
                .execute(
                    "update annotations set owner_id = $1, work_id = $2 where owner_id = $3 and id = $4",
                    &[&users[1].id, &users[1].works[0], &users[0].id, &id],
                )
                .await
                .expect("transfer");
            assert_eq!(n, 1, "transfer");
            big[1].push(id);
            touched.insert(users[0].id);
            touched.insert(users[1].id);
        }
        tx.commit().await.expect("commit");
        for owner in touched {
            log.txids.push((owner, txid.clone()));
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.below(50) as u64)).await;
    }
    assert!(transferred, "the transfer did not run");
    log
}

fn subs_for(user: &User) -> (Vec<SubSpec>, Vec<SubSpec>, Vec<SubSpec>, Vec<SubSpec>) {
    let w = |i: usize| user.works[i].to_string();
    let a = vec![
        sub("works", "works", json!(null), "true".into()),
        sub("ann_all", "annotations", json!({}), "true".into()),
        // Upper case on purpose: the server canonicalises values through Postgres.
        sub(
            "ann_w0",
            "annotations",
            json!({"work_id": w(0).to_uppercase()}),
            format!("work_id = '{}'", w(0)),
        ),
        sub(
            "ann_kind",
            "annotations",
            json!({"kind": {"in": ["note", "ink"]}}),
            "kind in ('note', 'ink')".into(),
        ),
    ];
    let b = vec![
        sub("ann_all", "annotations", json!(null), "true".into()),
        // A boolean filter: the live path compares pgoutput's `t`, the snapshot query the column itself.
        sub(
            "works_fav",
            "works",
            json!({"favorite": true}),
            "favorite".into(),
        ),
        sub(
            "ann_nocolor",
            "annotations",
            json!({"color": null}),
            "color is null".into(),
        ),
        sub(
            "ann_w1_hl",
            "annotations",
            json!({"work_id": w(1), "kind": "highlight"}),
            format!("work_id = '{}' and kind = 'highlight'", w(1)),
        ),
    ];
    let late = vec![
        sub("works", "works", json!(null), "true".into()),
        sub(
            "ann_w12",
            "annotations",
            json!({"work_id": {"in": [w(1), w(2)]}}),
            format!("work_id in ('{}', '{}')", w(1), w(2)),
        ),
    ];
    let late_more = vec![sub(
        "ann_note",
        "annotations",
        json!({"kind": "note"}),
        "kind = 'note'".into(),
    )];
    (a, b, late, late_more)
}

/// The rows Postgres has for `user` and `spec`, rendered exactly as the snapshot path renders them.
async fn expected_rows(
    db: &tokio_postgres::Client,
    user: Uuid,
    spec: &SubSpec,
) -> BTreeMap<String, Value> {
    let columns: Vec<(String, u32)> = db
        .query(
            "select attname::text, atttypid from pg_attribute
              where attrelid = $1::text::regclass and attnum > 0 and not attisdropped and attgenerated = ''
              order by attnum",
            &[&spec.table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| (r.get(0), r.get::<_, u32>(1)))
        .collect();
    // The type's output function, as pgoutput and the snapshot print values (`bool::text` would say `true`).
    let list: Vec<String> = columns
        .iter()
        .map(|(n, _)| format!("case when {n} is null then null else format('%s', {n}) end"))
        .collect();
    let sql = format!(
        "select {} from {} where owner_id = $1 and ({})",
        list.join(", "),
        spec.table,
        spec.sql
    );
    let mut out = BTreeMap::new();
    for row in db.query(&sql, &[&user]).await.expect("expected rows") {
        let mut buf = Vec::new();
        convert::write_row(
            &mut buf,
            columns
                .iter()
                .enumerate()
                .map(|(i, (name, oid))| (name.as_str(), *oid, row.get::<_, Option<&str>>(i))),
        );
        let value: Value = serde_json::from_slice(&buf).expect("row JSON");
        out.insert(value["id"].as_str().expect("id").to_owned(), value);
    }
    out
}

fn parse_offset(s: &str) -> (i64, u64) {
    let (g, l) = s.split_once('-').unwrap_or_else(|| panic!("offset {s:?}"));
    (
        g.parse().expect("generation"),
        u64::from_str_radix(l, 16).expect("lsn"),
    )
}

/// Per subscription, replayed from the frames: the row set, the `(xid, row id, op)` keys and the last offset.
#[derive(Default)]
struct Replay {
    rows: BTreeMap<String, Value>,
    keys: HashMap<(String, String, String), usize>,
    last: Option<(i64, u64)>,
}

/// Replays a client's frames, returning every violation found.
fn check_frames(log: &ClientLog, violations: &mut Vec<String>) -> HashMap<String, Replay> {
    let label = &log.label;
    let owner = log.user.to_string();
    let tables: HashMap<&str, &str> = log.subs.iter().map(|s| (s.id.as_str(), s.table)).collect();
    let mut replay: HashMap<String, Replay> = HashMap::new();
    let mut v = |m: String| violations.push(format!("{label}: {m}"));
    for (index, (socket, frame)) in log.frames.iter().enumerate() {
        let id = frame["id"].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str().unwrap_or_default() {
            "error" => v(format!("error frame on socket {socket}: {frame}")),
            "must_refetch" => {
                replay.insert(id, Replay::default());
            }
            "snapshot" => {
                let r = replay.entry(id.clone()).or_default();
                for row in frame["rows"].as_array().expect("rows") {
                    if row["owner_id"] != owner.as_str() {
                        v(format!("snapshot {id} carried another owner's row: {row}"));
                    }
                    let key = row["id"].as_str().unwrap_or_default().to_owned();
                    if r.rows.insert(key.clone(), row.clone()).is_some() {
                        v(format!("snapshot {id} carried row {key} twice"));
                    }
                }
            }
            "up_to_date" => {
                let r = replay.entry(id.clone()).or_default();
                let offset = parse_offset(frame["offset"].as_str().unwrap_or_default());
                if r.last.is_some_and(|last| offset < last) {
                    v(format!("up_to_date {id} went back: {frame}"));
                }
                r.last = Some(offset);
            }
            "txn" => {
                let xid = frame["xid"].as_str().unwrap_or_default().to_owned();
                let offset = parse_offset(frame["offset"].as_str().unwrap_or_default());
                let mut subs_here = HashSet::new();
                for change in frame["changes"].as_array().expect("changes") {
                    let sub_id = change["id"].as_str().unwrap_or_default().to_owned();
                    let row = &change["row"];
                    let op = change["op"].as_str().unwrap_or_default().to_owned();
                    let key = row["id"].as_str().unwrap_or_default().to_owned();
                    if row["owner_id"] != owner.as_str() {
                        v(format!(
                            "txn {xid} carried another owner's row to {sub_id}: {row}"
                        ));
                    }
                    match tables.get(sub_id.as_str()) {
                        Some(t) if change["table"] == *t => {}
                        _ => v(format!(
                            "txn {xid}: change for unknown subscription or table: {change}"
                        )),
                    }
                    if change.get("unchanged").is_some() {
                        v(format!(
                            "txn {xid}: a patch under REPLICA IDENTITY FULL: {change}"
                        ));
                    }
                    let r = replay.entry(sub_id.clone()).or_default();
                    if let Some(first) =
                        r.keys.insert((xid.clone(), key.clone(), op.clone()), index)
                        && first != index
                    {
                        v(format!(
                            "{sub_id}: ({xid}, {key}, {op}) arrived twice (frames {first} and {index})"
                        ));
                    }
                    let had = r.rows.contains_key(&key);
                    match op.as_str() {
                        "insert" if had => v(format!(
                            "{sub_id}: insert of row {key} it already had (xid {xid})"
                        )),
                        "update" | "delete" if !had => v(format!(
                            "{sub_id}: {op} of row {key} it never had (xid {xid})"
                        )),
                        "insert" | "update" | "delete" => {}
                        other => v(format!("unknown op {other:?}")),
                    }
                    if op == "delete" {
                        r.rows.remove(&key);
                    } else {
                        r.rows.insert(key, row.clone());
                    }
                    subs_here.insert(sub_id);
                }
                for sub_id in subs_here {
                    let r = replay.entry(sub_id.clone()).or_default();
                    if r.last.is_some_and(|last| offset <= last) {
                        v(format!(
                            "{sub_id}: txn {xid} offset {:?} not after {:?}",
                            offset, r.last
                        ));
                    }
                    r.last = Some(offset);
                }
            }
            _ => {}
        }
    }
    replay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oracle_every_subscriber_converges_to_postgres() {
    let test_started = Instant::now();
    let env = Arc::new(TestEnv::start().await);

    // Users and their permanent works, plus a few annotations before anyone subscribes.
    let mut rng = Lcg::new(42);
    let mut users = Vec::new();
    for _ in 0..USERS {
        let user = User {
            id: Uuid::new_v4(),
            works: (0..BASE_WORKS).map(|_| Uuid::new_v4()).collect(),
        };
        let mut ops: Vec<Value> = user
            .works
            .iter()
            .enumerate()
            .map(|(i, w)| {
                insert(
                    "works",
                    json!({"id": w, "title": format!("Base work {i}"), "year": 2000 + i}),
                )
            })
            .collect();
        for _ in 0..6 {
            let work = *rng.pick(&user.works);
            ops.push(insert(
                "annotations",
                annotation_row(&mut rng, Uuid::new_v4(), work, false),
            ));
        }
        let (status, body) = env.batch(user.id, Value::Array(ops)).await;
        assert_eq!(status, 200, "{body}");
        users.push(user);
    }

    // Clients. Writers start once every steady and resuming client is up to date.
    let (started_tx, started_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(64);
    let mut marker_txs = Vec::new();
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (marker_tx, marker_rx) = watch::channel(None);
        marker_txs.push(marker_tx);
        let (a, b, late, late_more) = subs_for(user);
        let mut runs = vec![
            ClientRun {
                label: format!("u{i}/A"),
                user: user.id,
                subs: a,
                plan: Plan::Steady,
            },
            ClientRun {
                label: format!("u{i}/B"),
                user: user.id,
                subs: b,
                plan: if i < 2 {
                    Plan::Resume(vec![
                        Duration::from_millis(1200),
                        Duration::from_millis(2800),
                    ])
                } else {
                    Plan::Steady
                },
            },
        ];
        if i % 2 == 0 {
            runs.push(ClientRun {
                label: format!("u{i}/C"),
                user: user.id,
                subs: late,
                plan: Plan::Late {
                    at: Duration::from_millis(700 + 300 * i as u64),
                    more_at: Duration::from_millis(2200),
                    more: late_more,
                },
            });
        }
        for run in runs {
            let shared = Shared {
                base: env.base.clone(),
                token: env.token(user.id),
                started: started_rx.clone(),
                marker: marker_rx.clone(),
                ready: ready_tx.clone(),
            };
            clients.push(tokio::spawn(run_client(run, shared)));
        }
    }
    drop(ready_tx);
    // Every client reports ready once (late ones at once, the others after their first up_to_date round).
    for _ in 0..clients.len() {
        let r = tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await;
        r.expect("clients ready in time")
            .expect("a client task died before it was ready");
    }
    started_tx.send_replace(Some(Instant::now()));
    let writes_started = Instant::now();

    // Writers.
    let altered = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, user) in users.iter().enumerate() {
        writers.push(tokio::spawn(batch_writer(
            env.clone(),
            user.clone(),
            1000 + i as u64,
            altered.clone(),
        )));
    }
    writers.push(tokio::spawn(sql_writer(
        env.clone(),
        users.clone(),
        altered.clone(),
    )));
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.expect("writer"));
    }
    let write_time = writes_started.elapsed();

    // Final markers: one batch per user that every subscription of that user matches.
    let mut markers = HashMap::new();
    for (user, marker_tx) in users.iter().zip(&marker_txs) {
        let ops = json!([
            insert("works", json!({"id": Uuid::new_v4(), "title": "marker"})),
            insert(
                "annotations",
                json!({"id": Uuid::new_v4(), "work_id": user.works[0], "kind": "note", "color": null, ADDED_COLUMN: 5})
            ),
            insert(
                "annotations",
                json!({"id": Uuid::new_v4(), "work_id": user.works[1], "kind": "highlight", "color": null})
            ),
        ]);
        let (status, body) = post_batch(&env, user.id, ops).await;
        assert_eq!(status, 200, "marker: {body}");
        let txid = body["txid"].as_str().expect("txid").to_owned();
        markers.insert(user.id, txid.clone());
        marker_tx.send_replace(Some(txid));
    }
    let mut clients_logs = Vec::new();
    for c in clients {
        clients_logs.push(c.await.expect("client task"));
    }

    // The checks.
    let db = env.superuser().await;
    let mut violations = Vec::new();
    let mut written: HashMap<Uuid, Vec<String>> = HashMap::new();
    let (mut ok, mut failed) = (0, 0);
    for log in &logs {
        ok += log.batches_ok;
        failed += log.batches_failed;
        for (owner, txid) in &log.txids {
            written.entry(*owner).or_default().push(txid.clone());
        }
    }
    let mut compared_rows = 0;
    let mut live_added_column = 0;
    let mut big_updates = 0;
    for log in &clients_logs {
        let replay = check_frames(log, &mut violations);
        for (_, frame) in &log.frames {
            for change in frame["changes"].as_array().into_iter().flatten() {
                if !change["row"][ADDED_COLUMN].is_null() {
                    live_added_column += 1;
                }
                if change["op"] == "update"
                    && change["row"]["body"]
                        .as_str()
                        .is_some_and(|b| b.len() > 10_000)
                {
                    big_updates += 1;
                }
            }
        }
        for spec in &log.subs {
            let expected = expected_rows(&db, log.user, spec).await;
            let got = log.state.get(&spec.id).cloned().unwrap_or_default();
            let replayed = replay
                .get(&spec.id)
                .map(|r| r.rows.clone())
                .unwrap_or_default();
            if got != replayed {
                violations.push(format!(
                    "{}: {}: the harness state and the replay differ",
                    log.label, spec.id
                ));
            }
            let mut got = got;
            if spec.table == "annotations" {
                for row in got.values_mut() {
                    if let Some(o) = row.as_object_mut() {
                        o.entry(ADDED_COLUMN).or_insert(Value::Null);
                    }
                }
            }
            compared_rows += expected.len();
            if got != expected {
                let missing: Vec<&String> =
                    expected.keys().filter(|k| !got.contains_key(*k)).collect();
                let extra: Vec<&String> =
                    got.keys().filter(|k| !expected.contains_key(*k)).collect();
                let differing: Vec<String> = expected
                    .iter()
                    .filter_map(|(k, e)| {
                        got.get(k)
                            .filter(|g| *g != e)
                            .map(|g| format!("{k}:\n  got      {g}\n  expected {e}"))
                    })
                    .take(3)
                    .map(|s| s.chars().take(1500).collect())
                    .collect();
                // The history of the first offending row, as received.
                let culprit = missing
                    .first()
                    .or(extra.first())
                    .map(|k| k.to_string())
                    .or_else(|| {
                        expected
                            .iter()
                            .find(|(k, e)| got.get(*k).is_some_and(|g| g != *e))
                            .map(|(k, _)| k.clone())
                    });
                let mut history = culprit
                    .clone()
                    .map(|k| row_history(log, &spec.id, &k))
                    .unwrap_or_default();
                if let Some(k) = &culprit {
                    // Which transaction wrote the row's current version.
                    let sql = format!(
                        "select xmin::text from {} where id = $1::text::uuid",
                        spec.table
                    );
                    if let Ok(Some(r)) = db.query_opt(&sql, &[k]).await {
                        history.push(format!("xmin in Postgres: {}", r.get::<_, String>(0)));
                    }
                }
                violations.push(format!(
                    "{}: {}: state differs from Postgres ({} rows expected, {} held): missing {missing:?}, extra {extra:?}, differing {differing:#?}\n  history of the first: {history:#?}",
                    log.label, spec.id, expected.len(), got.len()
                ));
            }
        }
        // Resumes and late subscriptions really happened, and while the writers were writing.
        let (sockets, events) = match &log.plan {
            Plan::Steady => (1, 0),
            Plan::Resume(times) => (1 + times.len(), times.len()),
            Plan::Late { .. } => (1, 2),
        };
        if log.sockets != sockets || log.events.len() != events {
            violations.push(format!(
                "{}: {} sockets and {} events, expected {sockets} and {events}",
                log.label,
                log.sockets,
                log.events.len()
            ));
        }
        if log.events.iter().any(|t| *t >= write_time) {
            violations.push(format!(
                "{}: a disconnect or late subscription at {:?} came after the writers finished ({write_time:?}): \
                 the scenario did not run as planned",
                log.label, log.events
            ));
        }
        if log.steady && log.label.ends_with("/A") {
            // The connection-level unit: one frame per committed transaction, its xid the batch's txid. A
            // `must_refetch` (the mid-run ALTER TABLE ... ADD COLUMN makes every subscription on the table refetch)
            // replaces part of the stream with a snapshot, and the handoff after it may re-send a transaction's
            // changes for the refetched subscription in a frame of their own: then only "every xid is one of the
            // user's txids" can be asserted.
            let refetched = log.frames.iter().any(|(_, f)| f["type"] == "must_refetch");
            let mut per_xid: HashMap<&str, usize> = HashMap::new();
            for (_, f) in &log.frames {
                if f["type"] == "txn" {
                    *per_xid
                        .entry(f["xid"].as_str().unwrap_or_default())
                        .or_default() += 1;
                }
            }
            for (xid, n) in &per_xid {
                if *n > 1 && !refetched {
                    violations.push(format!("{}: xid {xid} in {n} frames", log.label));
                }
            }
            let mut expected_xids: HashSet<&str> = written
                .get(&log.user)
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            expected_xids.insert(markers[&log.user].as_str());
            let got_xids: HashSet<&str> = per_xid.keys().copied().collect();
            let missing: Vec<_> = expected_xids.difference(&got_xids).collect();
            let unexpected: Vec<_> = got_xids.difference(&expected_xids).collect();
            if (!missing.is_empty() && !refetched) || !unexpected.is_empty() {
                violations.push(format!(
                    "{}: txn xids differ from the writers' txids: missing {missing:?}, unexpected {unexpected:?}",
                    log.label
                ));
            }
        }
    }
    let frames: usize = clients_logs.iter().map(|l| l.frames.len()).sum();
    let refetches = clients_logs
        .iter()
        .flat_map(|l| &l.frames)
        .filter(|(_, f)| f["type"] == "must_refetch")
        .count();
    eprintln!(
        "oracle: {} clients, {frames} frames ({refetches} must_refetch), {compared_rows} rows compared; batches ok {ok} / failed {failed}; \
         {} (owner, SQL transaction) pairs; {live_added_column} live rows with {ADDED_COLUMN}; {big_updates} updates of TOASTed rows; \
         writes {write_time:?}, total {:?}",
        clients_logs.len(),
        logs.last().map_or(0, |l| l.txids.len()),
        test_started.elapsed()
    );
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(
        live_added_column > 0,
        "no row with the added column came through the live path"
    );
    assert!(
        big_updates > 0,
        "no update of a TOASTed row came through the live path"
    );
    assert!(
        ok > failed * 4,
        "too many failed batches ({failed} of {})",
        ok + failed
    );
}

/// Every frame that carried row `key` to subscription `sub`, abbreviated.
fn row_history(log: &ClientLog, sub: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (socket, f)) in log.frames.iter().enumerate() {
        let short = |row: &Value| {
            let mut r = row.clone();
            for big in ["body", "quote"] {
                if let Some(t) = r[big].as_str().filter(|t| t.len() > 40) {
                    r[big] = json!(format!("<{} chars>", t.len()));
                }
            }
            r.to_string()
        };
        match f["type"].as_str() {
            Some("snapshot") if f["id"] == sub => {
                for row in f["rows"].as_array().into_iter().flatten() {
                    if row["id"] == key {
                        out.push(format!("#{i} s{socket} snapshot {}", short(row)));
                    }
                }
            }
            Some("txn") => {
                for c in f["changes"].as_array().into_iter().flatten() {
                    if c["id"] == sub && c["row"]["id"] == key {
                        out.push(format!(
                            "#{i} s{socket} txn {} {} {}",
                            f["xid"],
                            c["op"],
                            short(&c["row"])
                        ));
                    }
                }
            }
            Some("must_refetch" | "up_to_date") if f["id"] == sub => {
                out.push(format!("#{i} s{socket} {f}"))
            }
            _ => {}
        }
    }
    out
}
