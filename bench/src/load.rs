//! Loading rows directly in SQL as the superuser (explicit `owner_id`; RLS does not apply to a superuser).

use std::time::Duration;

use anyhow::Context;
use uuid::Uuid;

use crate::env::Env;
use crate::write::BODY;

/// Inserts `txns` transactions of `rows_per_txn` annotations each; transaction `t` belongs to
/// `owners[t % owners.len()]`. Each transaction is one autocommit `INSERT … SELECT … generate_series`, spread
/// over `writers` connections. Bounded by `limit`.
pub(crate) async fn load_rows(
    env: &Env,
    owners: &[Uuid],
    txns: usize,
    rows_per_txn: usize,
    writers: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let sql = format!(
        "insert into annotations (id, owner_id, kind, body, page, geometry)
         select gen_random_uuid(), $1, 'note', $2, 1, '{{\"x\":1}}'::jsonb from generate_series(1, {rows_per_txn})"
    );
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = env.sql().await?;
        let mine: Vec<Uuid> = (w..txns)
            .step_by(writers)
            .map(|t| owners[t % owners.len()])
            .collect();
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(&sql).await?;
            for owner in mine {
                client.execute(&stmt, &[&owner, &BODY]).await?;
            }
            anyhow::Ok(())
        }));
    }
    let all = futures::future::join_all(tasks);
    for r in tokio::time::timeout(limit, all)
        .await
        .with_context(|| format!("loading rows took longer than {limit:?}"))?
    {
        r??;
    }
    Ok(())
}
