//! The snapshot spool: rows pass from the job that reads them out of Postgres to the task that hands them to a
//! client, through memory up to a byte budget and, past it, through a temporary file, in order.
//!
//! ```text
//!   snapshot reader (holds the DB connection)            forwarder (holds no connection)
//!     push(row) ──► block (≤ 16 kB) ──publish──► memory queue ──┐
//!               └─► over budget: pending ──write_at──► temp file ┴─► next() ──► sink.row() at the client's pace
//! ```
//!
//! Why: a snapshot used to hand each row to its sink while the rows were read, so a client that did not read held a
//! pooled connection and an open `REPEATABLE READ` transaction (and with it the database's `xmin`) for as long as it
//! liked. The writer here never waits for the reader: it keeps rows in memory while the spool's budget and the
//! server-wide budget ([`MemoryBudget`]) allow, and appends the rest to an unnamed temporary file (`TMPDIR`; unlinked
//! from the start, so nothing is left behind, even after a crash). The reader takes memory blocks first, then the
//! file up to the length the writer has flushed (`file_len`, published under the lock after each positional
//! write); once it has read everything the file holds, the writer goes back to memory. Memory blocks are always
//! older than unread file data, so the order is the order Postgres produced.
//!
//! Latency for a fast client stays that of streaming: the writer publishes a block as soon as the reader waits for
//! one (`reader_waiting`), and the job wakes from waiting on Postgres to publish what it holds when the reader gets
//! hungry ([`SpoolWriter::reader_hungry`]). Otherwise it batches up to 16 kB (memory) or 256 kB (file) per hand-over.
//!
//! A record is `u32 body length, then per field: u32 length (u32::MAX = NULL) and the bytes`, little-endian; the
//! same bytes in memory and in the file.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A memory block is handed to the reader once it holds this much (or at once when the reader waits).
const BLOCK_BYTES: usize = 16 * 1024;
/// File writes and reads are done in pieces of about this size.
const FILE_CHUNK: usize = 256 * 1024;
/// The length that marks a NULL field.
const NULL: u32 = u32::MAX;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The reading side went away (the client disconnected): stop producing.
    #[error("the snapshot's receiver went away")]
    ReaderGone,
    /// The writing side ended without finishing (it failed or panicked).
    #[error("the snapshot reader ended early")]
    WriterGone,
    /// The server-wide number of spill files is reached.
    #[error("too many snapshot spill files open")]
    TooManyFiles,
    /// Creating, writing or reading the spill file failed (disk full, TMPDIR missing…).
    #[error("snapshot spill file: {0}")]
    Io(#[from] std::io::Error),
    /// A row or field does not fit the record format (over 4 GiB), or the bytes read back are not a record.
    #[error("snapshot spill record malformed")]
    Malformed,
}

/// A byte budget shared by every spool of a server: memory beyond it goes to disk.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes held in memory by all spools now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Counters of a server's spools.
#[derive(Debug, Default)]
pub struct SpillStats {
    /// Bytes written to spill files since start.
    pub spilled_bytes: AtomicU64,
    /// Spill files created since start.
    pub files_created: AtomicU64,
    /// Spill files open now.
    pub files_open: AtomicUsize,
}

/// What every spool of a server shares.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Most bytes one spool keeps in memory.
    pub spool_bytes: usize,
    /// Most spill files open at once (each is one file descriptor).
    pub max_files: usize,
    /// The server-wide memory budget.
    pub budget: Arc<MemoryBudget>,
    /// Counters.
    pub stats: Arc<SpillStats>,
}

impl SpoolConfig {
    /// A configuration with its own budget and counters.
    pub fn new(spool_bytes: usize, total_bytes: usize, max_files: usize) -> Self {
        Self {
            spool_bytes,
            max_files,
            budget: Arc::new(MemoryBudget::new(total_bytes)),
            stats: Arc::new(SpillStats::default()),
        }
    }
}

struct State<E> {
    /// Published memory blocks (whole records), oldest first.
    blocks: VecDeque<Vec<u8>>,
    /// The spill file, once created.
    file: Option<Arc<File>>,
    /// Bytes of the file written and readable.
    file_len: u64,
    /// How the writer ended (`None` while it runs).
    end: Option<Result<(), E>>,
}

struct Shared<E> {
    state: Mutex<State<E>>,
    /// Wakes the reader (data or end published).
    to_reader: Notify,
    /// Wakes the writer (the reader waits, or went away).
    to_writer: Notify,
    reader_waiting: AtomicBool,
    reader_gone: AtomicBool,
    /// How far the reader has read the file.
    file_read: AtomicU64,
    /// Bytes this spool has reserved from the budget (writer's block, queued blocks, reader's current block).
    mem_used: AtomicUsize,
    config: SpoolConfig,
}

impl<E> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.mem_used.fetch_sub(n, Ordering::AcqRel);
            self.config.budget.release(n);
        }
    }
}

impl<E> Drop for Shared<E> {
    fn drop(&mut self) {
        // Both halves are gone: whatever is still reserved goes back to the server-wide budget.
        self.config.budget.release(*self.mem_used.get_mut());
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if state.file.is_some() {
            self.config.stats.files_open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Creates a spool: the writer for the job that reads rows, the reader for the task that sends them.
pub fn spool<E: From<SpoolError>>(config: SpoolConfig) -> (SpoolWriter<E>, SpoolReader<E>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            blocks: VecDeque::new(),
            file: None,
            file_len: 0,
            end: None,
        }),
        to_reader: Notify::new(),
        to_writer: Notify::new(),
        reader_waiting: AtomicBool::new(false),
        reader_gone: AtomicBool::new(false),
        file_read: AtomicU64::new(0),
        mem_used: AtomicUsize::new(0),
        config,
    });
    (
        SpoolWriter {
            shared: shared.clone(),
            block: Vec::new(),
            pending: Vec::new(),
            file: None,
            written: 0,
            spilling: false,
            finished: false,
        },
        SpoolReader {
            shared,
            buf: Vec::new(),
            pos: 0,
            reserved: 0,
            file_pos: 0,
        },
    )
}

/// The producing half. Never waits for the reader.
pub struct SpoolWriter<E: From<SpoolError>> {
    shared: Arc<Shared<E>>,
    /// Memory records not yet handed to the reader (reserved from the budgets).
    block: Vec<u8>,
    /// File records not yet written.
    pending: Vec<u8>,
    file: Option<Arc<File>>,
    /// Bytes written to the file.
    written: u64,
    /// Records go to the file (memory was full); back to memory once the reader has read the whole file.
    spilling: bool,
    finished: bool,
}

impl<E: From<SpoolError>> SpoolWriter<E> {
    /// Appends one row (its fields in column order).
    pub async fn push<'a>(
        &mut self,
        fields: impl Iterator<Item = Option<&'a str>>,
    ) -> Result<(), SpoolError> {
        if self.shared.reader_gone.load(Ordering::Acquire) {
            return Err(SpoolError::ReaderGone);
        }
        if self.spilling
            && self.pending.is_empty()
            && self.shared.file_read.load(Ordering::Acquire) == self.written
        {
            // The reader has consumed everything (memory blocks come before file data): memory again.
            self.spilling = false;
        }
        if !self.spilling {
            let start = self.block.len();
            let n = encode(&mut self.block, fields)?;
            if self.reserve(n) {
                if self.block.len() >= BLOCK_BYTES
                    || self.shared.reader_waiting.load(Ordering::Acquire)
                {
                    self.publish_block();
                }
                return Ok(());
            }
            let record = self.block.split_off(start);
            self.publish_block();
            self.spilling = true;
            self.pending.extend_from_slice(&record);
        } else {
            encode(&mut self.pending, fields)?;
        }
        if self.pending.len() >= FILE_CHUNK || self.shared.reader_waiting.load(Ordering::Acquire) {
            self.flush_file().await?;
        }
        Ok(())
    }

    /// Whether rows are held that the reader cannot see yet.
    pub fn has_unpublished(&self) -> bool {
        !self.block.is_empty() || !self.pending.is_empty()
    }

    /// Resolves when the reader waits for rows (or went away): then [`SpoolWriter::publish`] what is held.
    pub async fn reader_hungry(&self) {
        loop {
            let notified = self.shared.to_writer.notified();
            if self.shared.reader_waiting.load(Ordering::Acquire)
                || self.shared.reader_gone.load(Ordering::Acquire)
            {
                return;
            }
            notified.await;
        }
    }

    /// Hands everything held to the reader.
    pub async fn publish(&mut self) -> Result<(), SpoolError> {
        self.publish_block();
        self.flush_file().await
    }

    /// Ends the spool: after the rows pushed so far the reader gets `end` (an `Err` is reported at once, without
    /// the remaining rows).
    pub async fn finish(mut self, end: Result<(), E>) {
        let end = match (end, self.publish().await) {
            (Ok(()), Err(e)) => Err(E::from(e)),
            (end, _) => end,
        };
        self.finished = true;
        self.shared.lock().end = Some(end);
        self.shared.to_reader.notify_one();
    }

    fn reserve(&self, n: usize) -> bool {
        let shared = &self.shared;
        if shared.mem_used.load(Ordering::Acquire) + n > shared.config.spool_bytes {
            return false;
        }
        if !shared.config.budget.try_reserve(n) {
            return false;
        }
        shared.mem_used.fetch_add(n, Ordering::AcqRel);
        true
    }

    fn publish_block(&mut self) {
        if self.block.is_empty() {
            return;
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK_BYTES));
        self.shared.lock().blocks.push_back(block);
        self.shared.to_reader.notify_one();
    }

    async fn flush_file(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let stats = self.shared.config.stats.clone();
        let created = self.file.is_none();
        if created {
            let open = stats.files_open.fetch_add(1, Ordering::AcqRel);
            if open >= self.shared.config.max_files {
                stats.files_open.fetch_sub(1, Ordering::AcqRel);
                return Err(SpoolError::TooManyFiles);
            }
        }
        let file = self.file.clone();
        let buf = std::mem::take(&mut self.pending);
        let offset = self.written;
        // Blocking file I/O off the async workers; one hand-over per ~256 kB.
        let (file, mut buf, result) = tokio::task::spawn_blocking(move || {
            let file = match file {
                Some(f) => f,
                None => match tempfile::tempfile() {
                    Ok(f) => Arc::new(f),
                    Err(e) => return (None, buf, Err(e)),
                },
            };
            let result = file.write_all_at(&buf, offset);
            (Some(file), buf, result)
        })
        .await
        .map_err(|e| SpoolError::Io(std::io::Error::other(e)))?;
        let Some(file) = file else {
            stats.files_open.fetch_sub(1, Ordering::AcqRel);
            return Err(result.err().map_or(SpoolError::Malformed, SpoolError::Io));
        };
        if created {
            stats.files_created.fetch_add(1, Ordering::Relaxed);
            // From here the shared state owns the file (and the open-files count, released when it drops).
            self.shared.lock().file = Some(file.clone());
            self.file = Some(file);
        }
        result?;
        let n = buf.len() as u64;
        buf.clear();
        self.pending = buf;
        self.written += n;
        stats.spilled_bytes.fetch_add(n, Ordering::Relaxed);
        self.shared.lock().file_len = self.written;
        self.shared.to_reader.notify_one();
        Ok(())
    }
}

impl<E: From<SpoolError>> Drop for SpoolWriter<E> {
    fn drop(&mut self) {
        let held = self.block.len();
        if held > 0 {
            self.shared.release(held);
        }
        if !self.finished {
            // Ended without `finish` (an error path or a panic): the reader must not wait for ever.
            let mut state = self.shared.lock();
            if state.end.is_none() {
                state.end = Some(Err(E::from(SpoolError::WriterGone)));
            }
            drop(state);
            self.shared.to_reader.notify_one();
        }
    }
}

/// The consuming half: rows in the order they were pushed.
pub struct SpoolReader<E: From<SpoolError>> {
    shared: Arc<Shared<E>>,
    /// Bytes being read: a memory block, or data read from the file (which may end inside a record).
    buf: Vec<u8>,
    pos: usize,
    /// Bytes of `buf` reserved from the budget (a memory block), released when it is used up.
    reserved: usize,
    file_pos: u64,
}

impl<E: From<SpoolError>> SpoolReader<E> {
    /// The next row's fields (borrowing the reader until the next call), `None` after the last one, or how the
    /// writer failed.
    pub async fn next(&mut self) -> Result<Option<Vec<Option<&str>>>, E> {
        if !self.fill().await? {
            return Ok(None);
        }
        let Some((body, len)) = record_at(&self.buf[self.pos..]) else {
            return Err(E::from(SpoolError::Malformed));
        };
        let start = self.pos + 4;
        self.pos += len;
        decode(&self.buf[start..start + body])
            .map(Some)
            .map_err(E::from)
    }

    /// Makes sure a whole record is at `buf[pos..]`; `false` at the end.
    async fn fill(&mut self) -> Result<bool, E> {
        enum Step<E> {
            Block(Vec<u8>),
            File(Arc<File>, u64),
            End(Result<(), E>),
            Wait,
        }
        let shared = self.shared.clone();
        loop {
            if record_at(&self.buf[self.pos..]).is_some() {
                return Ok(true);
            }
            let partial = self.buf.len() - self.pos;
            if partial == 0 && self.reserved > 0 {
                self.shared.release(std::mem::take(&mut self.reserved));
            }
            let notified = shared.to_reader.notified();
            let step = {
                let mut state = shared.lock();
                if matches!(state.end, Some(Err(_))) {
                    Step::End(state.end.take().unwrap_or(Ok(())))
                } else if let Some(block) =
                    (partial == 0).then(|| state.blocks.pop_front()).flatten()
                {
                    Step::Block(block)
                } else if state.file_len > self.file_pos {
                    match &state.file {
                        Some(f) => Step::File(f.clone(), state.file_len),
                        None => Step::End(Err(E::from(SpoolError::Malformed))),
                    }
                } else if state.end.is_some() && state.blocks.is_empty() {
                    if partial > 0 {
                        Step::End(Err(E::from(SpoolError::Malformed)))
                    } else {
                        Step::End(state.end.take().unwrap_or(Ok(())))
                    }
                } else {
                    shared.reader_waiting.store(true, Ordering::Release);
                    Step::Wait
                }
            };
            match step {
                Step::Block(block) => {
                    self.reserved = block.len();
                    self.buf = block;
                    self.pos = 0;
                }
                Step::File(file, len) => self.read_file(file, len).await?,
                Step::End(end) => return end.map(|()| false),
                Step::Wait => {
                    shared.to_writer.notify_one();
                    notified.await;
                    shared.reader_waiting.store(false, Ordering::Release);
                }
            }
        }
    }

    /// Appends the next piece of the file (up to `len`) to what is left of `buf`.
    async fn read_file(&mut self, file: Arc<File>, len: u64) -> Result<(), E> {
        let want =
            usize::try_from((len - self.file_pos).min(FILE_CHUNK as u64)).unwrap_or(FILE_CHUNK);
        self.buf.drain(..self.pos);
        self.pos = 0;
        let start = self.buf.len();
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(start + want, 0);
        let offset = self.file_pos;
        let (buf, result) = tokio::task::spawn_blocking(move || {
            let result = file.read_exact_at(&mut buf[start..], offset);
            (buf, result)
        })
        .await
        .map_err(|e| E::from(SpoolError::Io(std::io::Error::other(e))))?;
        self.buf = buf;
        result.map_err(|e| E::from(SpoolError::Io(e)))?;
        self.file_pos += want as u64;
        self.shared
            .file_read
            .store(self.file_pos, Ordering::Release);
        Ok(())
    }
}

impl<E: From<SpoolError>> Drop for SpoolReader<E> {
    fn drop(&mut self) {
        self.shared.release(self.reserved);
        self.shared.reader_gone.store(true, Ordering::Release);
        self.shared.to_writer.notify_one();
    }
}

/// Appends one record; returns its length.
fn encode<'a>(
    buf: &mut Vec<u8>,
    fields: impl Iterator<Item = Option<&'a str>>,
) -> Result<usize, SpoolError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    for field in fields {
        match field {
            None => buf.extend_from_slice(&NULL.to_le_bytes()),
            Some(text) => {
                let len = u32::try_from(text.len())
                    .ok()
                    .filter(|l| *l != NULL)
                    .ok_or(SpoolError::Malformed)?;
                buf.extend_from_slice(&len.to_le_bytes());
                buf.extend_from_slice(text.as_bytes());
            }
        }
    }
    let body = u32::try_from(buf.len() - start - 4).map_err(|_| SpoolError::Malformed);
    match body {
        Ok(body) => {
            buf[start..start + 4].copy_from_slice(&body.to_le_bytes());
            Ok(buf.len() - start)
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

/// `(body length, record length)` of a whole record at the start of `bytes`.
fn record_at(bytes: &[u8]) -> Option<(usize, usize)> {
    let head: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let body = usize::try_from(u32::from_le_bytes(head)).ok()?;
    (bytes.len() >= 4 + body).then_some((body, 4 + body))
}

fn decode(mut body: &[u8]) -> Result<Vec<Option<&str>>, SpoolError> {
    let mut fields = Vec::new();
    while !body.is_empty() {
        let head: [u8; 4] = body
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or(SpoolError::Malformed)?;
        body = &body[4..];
        let len = u32::from_le_bytes(head);
        if len == NULL {
            fields.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| SpoolError::Malformed)?;
        let text = body.get(..len).ok_or(SpoolError::Malformed)?;
        fields.push(Some(
            std::str::from_utf8(text).map_err(|_| SpoolError::Malformed)?,
        ));
        body = &body[len..];
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn row(i: usize) -> Vec<Option<String>> {
        vec![
            Some(i.to_string()),
            (!i.is_multiple_of(3)).then(|| "é".repeat(i % 50)),
            None,
            Some(String::new()),
        ]
    }

    fn config(spool_bytes: usize, total: usize) -> SpoolConfig {
        SpoolConfig::new(spool_bytes, total, 16)
    }

    async fn push(w: &mut SpoolWriter<SpoolError>, i: usize) -> Result<(), SpoolError> {
        let r = row(i);
        w.push(r.iter().map(|f| f.as_deref())).await
    }

    /// A reader that stalls now and then, over budgets from "everything spills" to "nothing does": every row
    /// arrives once, in order, and the memory is given back.
    #[tokio::test]
    async fn rows_arrive_in_order_through_memory_and_file() {
        for (spool_bytes, total) in [(0, 0), (64, 1 << 20), (4096, 2048), (1 << 20, 1 << 20)] {
            let config = config(spool_bytes, total);
            let (mut w, mut r) = spool::<SpoolError>(config.clone());
            const N: usize = 20_000;
            let reader = tokio::spawn(async move {
                let mut i = 0;
                while let Some(fields) = r.next().await.expect("rows") {
                    let expected = row(i);
                    let expected: Vec<Option<&str>> =
                        expected.iter().map(|f| f.as_deref()).collect();
                    assert_eq!(fields, expected, "row {i}");
                    i += 1;
                    if i.is_multiple_of(5000) {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
                i
            });
            for i in 0..N {
                push(&mut w, i).await.expect("push");
                if i.is_multiple_of(7000) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            w.finish(Ok(())).await;
            assert_eq!(reader.await.unwrap(), N, "budget {spool_bytes}/{total}");
            let spilled = config.stats.spilled_bytes.load(Ordering::Relaxed);
            if spool_bytes < 4096 {
                assert!(spilled > 0, "budget {spool_bytes}: nothing spilled");
            }
            assert_eq!(config.budget.used(), 0, "memory given back");
            assert_eq!(
                config.stats.files_open.load(Ordering::Relaxed),
                0,
                "file closed"
            );
        }
    }

    /// A waiting reader gets a row as soon as it is pushed, long before the writer finishes (streaming).
    #[tokio::test]
    async fn a_waiting_reader_gets_rows_at_once() {
        let (mut w, mut r) = spool::<SpoolError>(config(1 << 20, 1 << 20));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(fields) = r.next().await.expect("rows") {
                tx.send(fields[0].map(str::to_owned)).unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 0..3 {
            push(&mut w, i).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert_eq!(got.ok().flatten().flatten(), Some(i.to_string()));
        }
        // Held rows are published when the reader gets hungry (the job wakes from waiting on Postgres for it).
        tokio::time::sleep(Duration::from_millis(20)).await;
        push(&mut w, 3).await.unwrap();
        if w.has_unpublished() {
            w.reader_hungry().await;
            w.publish().await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.ok().flatten().flatten(), Some("3".to_owned()));
        w.finish(Ok(())).await;
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn errors_and_departures_end_the_other_side() {
        // The writer fails: the reader gets the error without the rows still queued.
        let (mut w, mut r) = spool::<SpoolError>(config(0, 0));
        push(&mut w, 1).await.unwrap();
        w.finish(Err(SpoolError::Malformed)).await;
        assert!(matches!(r.next().await, Err(SpoolError::Malformed)));

        // The writer is dropped without finishing: the reader does not wait for ever (and does not take the rows
        // it got for a whole snapshot).
        let (mut w, mut r) = spool::<SpoolError>(config(1 << 20, 1 << 20));
        push(&mut w, 1).await.unwrap();
        w.publish().await.unwrap();
        drop(w);
        assert!(matches!(r.next().await, Err(SpoolError::WriterGone)));

        // The reader goes away: the writer stops, and the memory is given back.
        let config = config(1 << 20, 1 << 20);
        let (mut w, r) = spool::<SpoolError>(config.clone());
        push(&mut w, 1).await.unwrap();
        drop(r);
        assert!(matches!(push(&mut w, 2).await, Err(SpoolError::ReaderGone)));
        drop(w);
        assert_eq!(config.budget.used(), 0);
    }

    #[tokio::test]
    async fn spill_files_are_bounded() {
        let config = SpoolConfig::new(0, 0, 1);
        let (mut w1, _r1) = spool::<SpoolError>(config.clone());
        push(&mut w1, 1).await.unwrap();
        w1.publish().await.unwrap();
        let (mut w2, _r2) = spool::<SpoolError>(config.clone());
        push(&mut w2, 1).await.unwrap();
        assert!(matches!(w2.publish().await, Err(SpoolError::TooManyFiles)));
        drop((w1, _r1));
        assert_eq!(config.stats.files_open.load(Ordering::Relaxed), 0);
    }
}
