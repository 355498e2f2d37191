//! The calls: keys checked, sorted and cut into statements; answers read back in the
//! order of the keys.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::Duration;

use sqlx::mysql::{MySql, MySqlArguments, MySqlConnection, MySqlRow};
use sqlx::{Arguments as _, Encode, Executor as _, Row as _, Type};
use tokio::sync::oneshot;

use super::Inner;
use super::builder::{Server, set_up};
use super::conn::{self, Step, Tx};
use super::purge;
use super::sql::{self, MAX_KEY_LEN, Record};
use crate::store::{HeldKey, StoreError, Token};

/// Keys per statement: a larger call is cut into transactions of this many keys at most.
const KEYS_PER_STATEMENT: usize = 1000;
/// Key bytes per statement at most (each key is written twice, in hex: ~4× in SQL), far below
/// the smallest `max_allowed_packet` of supported servers (4 MiB).
const KEY_BYTES_PER_STATEMENT: usize = 192 * 1024;

impl Inner {
    /// Sets the table up once (for a store on the application's pool), and starts the purge;
    /// answers what the server offers.
    pub(super) async fn ready(&self) -> Result<Server, StoreError> {
        if let Some(server) = self.ready.get() {
            return Ok(*server);
        }
        self.ready
            .get_or_try_init(|| async {
                let mut held = conn::acquire(&self.pool, &self.probe, self.timeout).await?;
                let done = set_up(held.conn(), &self.sql, &self.table, self.create_table).await;
                match done {
                    Ok(_) => held.give_back(),
                    Err(_) => held.close(),
                }
                let server = self.allowed(done?);
                self.start_purge();
                Ok::<Server, StoreError>(server)
            })
            .await
            .copied()
    }

    /// For a store set up by `connect`: ready now.
    pub(super) fn mark_ready(&self, server: Server) {
        if self.ready.set(self.allowed(server)).is_ok() {
            self.start_purge();
        }
    }

    /// What the server offers that this store may use.
    fn allowed(&self, server: Server) -> Server {
        Server {
            returning: server.returning && self.returning,
        }
    }

    pub(super) fn start_purge(&self) {
        let (stop, stopped) = oneshot::channel();
        *self
            .stop_purge
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stop);
        purge::spawn(self.pool.clone(), self.sql.clone(), self.purge, stopped);
    }

    /// Runs `steps` on a connection of the pool (see [`conn::run`]).
    async fn run(
        &self,
        op: &'static str,
        steps: &[Step<'_>],
        tx: Tx,
    ) -> Result<Vec<MySqlRow>, StoreError> {
        let ran = conn::run(&self.pool, &self.probe, op, steps, tx, self.timeout).await?;
        Ok(ran.rows)
    }

    /// Records `keys` (absent or expired ones) as `record` for `ttl` with `token`; answers
    /// per key what its row holds after the call.
    pub(super) async fn record(
        &self,
        op: &'static str,
        keys: Vec<Vec<u8>>,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut answers = vec![Outcome::Ours; keys.len()];
        let sorted = sorted_keys(keys.iter().map(|k| (k.as_slice(), ())), &mut answers)?;
        let server = self.ready().await?;
        let namespace = self.namespace.as_bytes();
        let token_bytes = token.to_bytes();
        let us = i64::try_from(sql::micros(ttl)).unwrap_or(i64::MAX);
        for chunk in chunks(&sorted) {
            let n = sql::shape_for(chunk.len());
            // Padded to the shape with the last key (a no-op for the server).
            let keys = || {
                let last = chunk[chunk.len() - 1].1;
                chunk
                    .iter()
                    .map(|&(_, k, ())| k)
                    .chain(std::iter::repeat(last))
                    .take(n)
            };
            let mut insert = MySqlArguments::default();
            for key in keys() {
                add(&mut insert, namespace)?;
                add(&mut insert, key)?;
                add(&mut insert, &token_bytes[..])?;
                add(&mut insert, us)?;
            }
            add(&mut insert, &token_bytes[..])?;
            add(&mut insert, &token_bytes[..])?;
            add(&mut insert, us)?;
            if server.returning {
                // One round trip: the upsert answers for every row as it left it.
                add(&mut insert, &token_bytes[..])?;
                let sql = self.sql.record_returning(record, n);
                let steps = [Step::PreparedRows(&sql, insert)];
                let ran = conn::run(&self.pool, &self.probe, op, &steps, Tx::None, self.timeout);
                for row in &ran.await?.rows {
                    let k: Option<Vec<u8>> =
                        row.try_get(0).map_err(|e| StoreError::backend(op, e))?;
                    let done: bool = row.try_get(1).map_err(|e| StoreError::backend(op, e))?;
                    // `NULL`: this request's row. A key: another request's, for each of its
                    // slots (a key may come twice in a call).
                    if let Some(k) = k {
                        for at in slots(op, chunk, &k)? {
                            answers[at] = Outcome::Held { done };
                        }
                    }
                }
                continue;
            }
            let mut select = MySqlArguments::default();
            add(&mut select, &token_bytes[..])?;
            add(&mut select, namespace)?;
            for key in keys() {
                add(&mut select, key)?;
            }
            // The upsert alone decides every key, atomically per key, and commits by itself;
            // when it met a live row of another request, the rows are read back to tell which.
            let steps = [
                Step::Prepared(&self.sql.record_insert(record, n), insert),
                Step::ReadBackIfMarked(&self.sql.record_select(record, n), select),
            ];
            let ran = conn::run(&self.pool, &self.probe, op, &steps, Tx::None, self.timeout);
            let ran = ran.await?;
            if !ran.read_back {
                continue;
            }
            // Ours are the rows with this token in this state: the upsert wrote them. Any
            // other key is not ours, also one whose row is gone since (removed, or expired
            // and purged): the conservative answer.
            for &(at, _, ()) in chunk {
                answers[at] = Outcome::Held { done: false };
            }
            for row in &ran.rows {
                let (k, done) = read_row(op, row, true)?;
                let mine: bool = row.try_get(2).map_err(|e| StoreError::backend(op, e))?;
                let at = find(op, chunk, &k)?;
                answers[at] = if mine {
                    Outcome::Ours
                } else {
                    Outcome::Held { done }
                };
            }
        }
        Ok(answers)
    }

    pub(super) async fn commit(
        &self,
        held: Vec<HeldKey>,
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "commit claims";
        // A key too long was never recorded (its claim passed unchecked): nothing to refuse.
        let mut answers = vec![Outcome::Ours; held.len()];
        let sorted = sorted_keys(held.iter().map(|(k, t)| (k.as_slice(), *t)), &mut answers)?;
        self.ready().await?;
        for chunk in chunks(&sorted) {
            let mut statement = String::from("BEGIN;\n");
            statement.push_str(&self.sql.commit(&by_token(chunk), ttl));
            statement.push_str("COMMIT");
            let steps = [Step::Text(&statement)];
            for row in self.run(OP, &steps, Tx::Inline).await? {
                let (k, _) = read_row(OP, &row, false)?;
                let at = find(OP, chunk, &k)?;
                answers[at] = Outcome::Held { done: true };
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a != Outcome::Held { done: true })
            .collect())
    }

    /// [`MySqlStore::commit_all_in`](super::MySqlStore::commit_all_in): prepared multi-row
    /// upserts ([`commit_rows`](sql::Sql::commit_rows)) on the caller's connection, inside its
    /// transaction (no `BEGIN`/`COMMIT` of their own); `true` if no key was refused.
    pub(super) async fn commit_in_tx(
        &self,
        conn: &mut MySqlConnection,
        held: &[HeldKey],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        const OP: &str = "commit claims in a transaction";
        if let Some((key, _)) = held.iter().find(|(k, _)| k.len() > MAX_KEY_LEN) {
            return Err(StoreError::KeyTooLong {
                len: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        let mut sorted: Vec<Slot<'_, Token>> = held
            .iter()
            .enumerate()
            .map(|(i, (k, t))| (i, k.as_slice(), *t))
            .collect();
        sorted.sort_unstable_by(|a, b| a.1.cmp(b.1).then(a.2.as_u128().cmp(&b.2.as_u128())));
        sorted.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
        if sorted.windows(2).any(|w| w[0].1 == w[1].1) {
            // One key under two tokens: at most one of them holds it.
            return Ok(false);
        }
        if sorted.is_empty() {
            return Ok(true);
        }
        self.ready().await?;
        let timeout = self.timeout;
        let namespace = self.namespace.as_bytes();
        let us = i64::try_from(sql::micros(ttl)).unwrap_or(i64::MAX);
        // Per token, its keys in order: one prepared statement per chunk (of a shape's size).
        // Its reply flags a refusal (the insert id): no read-back.
        for (token, keys) in by_token(&sorted) {
            let token = token.to_bytes();
            for chunk in keys.chunks(KEYS_PER_STATEMENT) {
                let n = sql::shape_for(chunk.len());
                let last = chunk[chunk.len() - 1];
                let mut args = MySqlArguments::default();
                for key in chunk.iter().copied().chain(std::iter::repeat(last)).take(n) {
                    add(&mut args, namespace)?;
                    add(&mut args, key)?;
                    add(&mut args, &token[..])?;
                    add(&mut args, us)?;
                }
                for _ in 0..4 {
                    add(&mut args, &token[..])?;
                }
                add(&mut args, us)?;
                let statement = self.sql.commit_rows(n);
                let query = sqlx::query_with::<MySql, _>(&statement, args).persistent(true);
                let done = super::within(timeout, async {
                    (&mut *conn)
                        .execute(query)
                        .await
                        .map_err(|e| conn::map_error(OP, e, timeout))
                })
                .await?;
                if done.last_insert_id() != 0 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    pub(super) async fn release(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        self.delete_held("release claims", held, true).await
    }

    pub(super) async fn take_back(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        self.delete_held("take keys back", held, false).await
    }

    pub(super) async fn renew(
        &self,
        held: Vec<HeldKey>,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "renew claims";
        let mut answers = vec![Outcome::Ours; held.len()];
        let mut renewed = vec![false; held.len()];
        // Keys too long were never recorded: nothing to renew (they answer `false`).
        let Ok(sorted) = sorted_keys(held.iter().map(|(k, t)| (k.as_slice(), *t)), &mut answers)
        else {
            return Ok(renewed);
        };
        self.ready().await?;
        for chunk in chunks(&sorted) {
            let groups = by_token(chunk);
            let mut statement = String::from("BEGIN;\n");
            statement.push_str(&self.sql.renew(&groups, lease));
            statement.push_str("COMMIT");
            let steps = [Step::Text(&statement)];
            for row in self.run(OP, &steps, Tx::Inline).await? {
                let (k, _) = read_row(OP, &row, false)?;
                let token: Vec<u8> = row.try_get(1).map_err(|e| StoreError::backend(OP, e))?;
                // The slots of this key (more than one if a key came under two tokens).
                let from = chunk.partition_point(|(_, key, _)| *key < k.as_slice());
                let same = chunk[from..]
                    .iter()
                    .take_while(|(_, key, _)| *key == k.as_slice());
                for &(at, _, held_by) in same {
                    if held_by.to_bytes().as_slice() == token.as_slice() {
                        renewed[at] = true;
                    }
                }
            }
        }
        Ok(renewed)
    }

    /// Deletes the rows the held keys' tokens hold: in flight only, or also done.
    async fn delete_held(
        &self,
        op: &'static str,
        held: Vec<HeldKey>,
        in_flight_only: bool,
    ) -> Result<(), StoreError> {
        let mut answers = vec![Outcome::Ours; held.len()];
        // Keys too long were never recorded: nothing to free.
        let Ok(sorted) = sorted_keys(held.iter().map(|(k, t)| (k.as_slice(), *t)), &mut answers)
        else {
            return Ok(());
        };
        self.ready().await?;
        for chunk in chunks(&sorted) {
            let statement = self.sql.release(&by_token(chunk), in_flight_only);
            self.run(op, &[Step::Text(&statement)], Tx::None).await?;
        }
        Ok(())
    }

    pub(super) async fn remove(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        const OP: &str = "remove keys";
        let mut answers = vec![Outcome::Ours; keys.len()];
        // Keys too long were never recorded: nothing to forget.
        let Ok(sorted) = sorted_keys(keys.iter().map(|k| (k.as_slice(), ())), &mut answers) else {
            return Ok(());
        };
        self.ready().await?;
        for chunk in chunks(&sorted) {
            let ks: Vec<&[u8]> = chunk.iter().map(|&(_, k, ())| k).collect();
            let statement = self.sql.remove(&ks);
            self.run(OP, &[Step::Text(&statement)], Tx::None).await?;
        }
        Ok(())
    }
}

/// What a key's row holds after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// As this request wrote it (or, for a commit, not refused).
    Ours,
    /// Another request's (another token, or the other state): done or in flight.
    Held { done: bool },
    /// Too long for the table: not sent.
    TooLong,
}

/// Adds a parameter (encoding bytes and integers cannot fail; an error is reported anyway).
fn add<'q, T: Encode<'q, MySql> + Type<MySql> + 'q>(
    args: &mut MySqlArguments,
    value: T,
) -> Result<(), StoreError> {
    args.add(value)
        .map_err(|e| StoreError::backend("encode a parameter", e))
}

/// A key of a call: its position in the call, its bytes, and what goes with it (a token).
type Slot<'a, X> = (usize, &'a [u8], X);

/// The keys that fit, with their positions, sorted by key (the order rows are locked in);
/// keys too long are marked in `answers`. All keys too long (and at least one): an error.
fn sorted_keys<'a, X>(
    keys: impl ExactSizeIterator<Item = (&'a [u8], X)>,
    answers: &mut [Outcome],
) -> Result<Vec<Slot<'a, X>>, StoreError> {
    let mut sorted = Vec::with_capacity(keys.len());
    let mut too_long = None;
    for (i, (key, extra)) in keys.enumerate() {
        if key.len() > MAX_KEY_LEN {
            answers[i] = Outcome::TooLong;
            too_long.get_or_insert(key.len());
        } else {
            sorted.push((i, key, extra));
        }
    }
    if let (true, Some(len)) = (sorted.is_empty(), too_long) {
        return Err(StoreError::KeyTooLong {
            len,
            max: MAX_KEY_LEN,
        });
    }
    sorted.sort_unstable_by(|a, b| a.1.cmp(b.1));
    Ok(sorted)
}

/// Consecutive runs of `sorted` of at most [`KEYS_PER_STATEMENT`] keys and
/// [`KEY_BYTES_PER_STATEMENT`] bytes (at least one key each).
fn chunks<'s, 'a, X>(sorted: &'s [Slot<'a, X>]) -> impl Iterator<Item = &'s [Slot<'a, X>]> {
    let mut rest = sorted;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < KEYS_PER_STATEMENT {
            bytes += rest[n].1.len();
            if n > 0 && bytes > KEY_BYTES_PER_STATEMENT {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// A chunk's keys grouped by token, each group in key order, groups by their first key.
fn by_token<'a>(chunk: &[Slot<'a, Token>]) -> Vec<(Token, Vec<&'a [u8]>)> {
    let mut groups: Vec<(Token, Vec<&'a [u8]>)> = Vec::new();
    let mut index: HashMap<Token, usize> = HashMap::new();
    for &(_, key, token) in chunk {
        let at = *index.entry(token).or_insert_with(|| {
            groups.push((token, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(key);
    }
    groups
}

/// The position (in the call's keys) of the row's key `k`, found in the sorted `chunk`.
fn find<X>(op: &'static str, chunk: &[Slot<'_, X>], k: &[u8]) -> Result<usize, StoreError> {
    chunk
        .binary_search_by(|(_, key, _)| (*key).cmp(k))
        .map(|at| chunk[at].0)
        .map_err(|_| {
            StoreError::backend(op, "the server answered for a key it was not asked about")
        })
}

/// The positions (in the call's keys) of every slot of the sorted `chunk` with key `k`.
fn slots<X>(
    op: &'static str,
    chunk: &[Slot<'_, X>],
    k: &[u8],
) -> Result<impl Iterator<Item = usize>, StoreError> {
    let from = chunk.partition_point(|(_, key, _)| *key < k);
    let same = chunk[from..]
        .iter()
        .take_while(move |(_, key, _)| *key == k);
    if same.clone().next().is_none() {
        return Err(StoreError::backend(
            op,
            "the server answered for a key it was not asked about",
        ));
    }
    Ok(same.map(|&(at, _, _)| at))
}

/// A row's key and, with `with_done`, its `done` column.
fn read_row(
    op: &'static str,
    row: &MySqlRow,
    with_done: bool,
) -> Result<(Vec<u8>, bool), StoreError> {
    let k: Vec<u8> = row.try_get(0).map_err(|e| StoreError::backend(op, e))?;
    let done = if with_done {
        row.try_get::<bool, _>(1)
            .map_err(|e| StoreError::backend(op, e))?
    } else {
        false
    };
    Ok((k, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_and_cut_into_chunks() {
        let keys: Vec<Vec<u8>> = (0..2_500u32)
            .rev()
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        let mut answers = vec![Outcome::Ours; keys.len()];
        let sorted = sorted_keys(keys.iter().map(|k| (k.as_slice(), ())), &mut answers).unwrap();
        assert!(sorted.windows(2).all(|w| w[0].1 < w[1].1));
        let sizes: Vec<usize> = chunks(&sorted).map(<[_]>::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        // Long keys: cut by bytes, at least one key per chunk.
        let long: Vec<Vec<u8>> = (0..400u32).map(|i| vec![(i % 251) as u8; 1000]).collect();
        let mut answers = vec![Outcome::Ours; long.len()];
        let sorted = sorted_keys(long.iter().map(|k| (k.as_slice(), ())), &mut answers).unwrap();
        let chunked: Vec<_> = chunks(&sorted).collect();
        assert!(
            chunked
                .iter()
                .all(|c| c.len() <= KEY_BYTES_PER_STATEMENT / 1000)
        );
        assert_eq!(chunked.iter().map(|c| c.len()).sum::<usize>(), 400);
        let found = find("x", chunked[0], chunked[0][3].1).unwrap();
        assert_eq!(found, chunked[0][3].0);
    }

    #[test]
    fn keys_too_long_are_set_aside() {
        let keys = [vec![1; MAX_KEY_LEN + 1], b"ok".to_vec()];
        let mut answers = vec![Outcome::Ours; 2];
        let sorted = sorted_keys(keys.iter().map(|k| (k.as_slice(), ())), &mut answers).unwrap();
        assert_eq!(sorted.len(), 1);
        assert_eq!(answers, [Outcome::TooLong, Outcome::Ours]);
        let only_long = [vec![1; MAX_KEY_LEN + 1]];
        let mut answers = vec![Outcome::Ours; 1];
        let e =
            sorted_keys(only_long.iter().map(|k| (k.as_slice(), ())), &mut answers).unwrap_err();
        assert!(
            matches!(e, StoreError::KeyTooLong { len, max } if len == MAX_KEY_LEN + 1 && max == MAX_KEY_LEN)
        );
    }

    #[test]
    fn commits_are_grouped_by_token() {
        let (a, b) = (Token::from_u128(1), Token::from_u128(2));
        let chunk: Vec<(usize, &[u8], Token)> = vec![(0, b"k1", a), (1, b"k2", b), (2, b"k3", a)];
        let groups = by_token(&chunk);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0], (a, vec![&b"k1"[..], b"k3"]));
        assert_eq!(groups[1], (b, vec![&b"k2"[..]]));
    }
}
