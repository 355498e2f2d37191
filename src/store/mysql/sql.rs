//! The SQL the MySQL store sends. Inserts and claims (the hot path) are prepared statements
//! of a few fixed sizes, their keys sent as parameters (the binary protocol: the server parses
//! no key); so is `commit_in`. Commits, releases and removals put every statement of a call
//! in one string (one round trip through the text protocol), with keys, tokens and the
//! namespace as hexadecimal literals, so nothing of the data is ever parsed as SQL.
//!
//! Only syntax that MySQL 8 and MariaDB 10.5+ both accept: `X'…'` literals,
//! `UTC_TIMESTAMP(6) + INTERVAL n MICROSECOND`, `INSERT … ON DUPLICATE KEY UPDATE` without
//! `VALUES()` (deprecated in MySQL 8.0.20) nor a row alias (not in MariaDB), `IF()`,
//! `LAST_INSERT_ID(expr)`, `SELECT … FOR UPDATE`, `DELETE … LIMIT`; and, sent only to MariaDB
//! 10.5+, `INSERT … RETURNING` ([`Sql::record_returning`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::store::Token;

/// The longest key the table's `k` column holds, in bytes. With the namespace (at most
/// [`MAX_NAMESPACE_LEN`]) the primary key stays within InnoDB's index limit for 8 KiB and
/// 16 KiB pages (1,536 and 3,072 bytes).
pub(super) const MAX_KEY_LEN: usize = 1024;
/// The longest namespace, in bytes (the `namespace` column).
pub(super) const MAX_NAMESPACE_LEN: usize = 255;
/// The longest ttl or lease sent (100 years, in µs); `DATETIME` ends with the year 9999.
const MAX_MICROS: u64 = 100 * 365 * 24 * 3600 * 1_000_000;

/// The table's definition (`{table}` stands for the quoted name).
pub(super) const DDL: &str = "CREATE TABLE IF NOT EXISTS {table} (
  namespace  VARBINARY(255)  NOT NULL,
  k          VARBINARY(1024) NOT NULL,
  token      BINARY(16)      NOT NULL,
  done       BOOLEAN         NOT NULL,
  expires_at DATETIME(6)     NOT NULL,
  PRIMARY KEY (namespace, k),
  KEY stream_dedup_expiry (expires_at)
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC";

/// A table name as given to the builder, checked, and as it is written in SQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TableName {
    /// As given (`table` or `schema.table`).
    pub(super) name: Box<str>,
    /// Quoted: `` `schema`.`table` ``.
    pub(super) quoted: Box<str>,
}

impl TableName {
    /// Checks `name`: one or two (`schema.table`) identifiers of ASCII letters, digits, `_` and
    /// `$`, not all digits, each at most 64 bytes. Anything else is refused, so that the name
    /// can be written into SQL as it is (quoted).
    pub(super) fn parse(name: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(format!("{name:?} has more than one `.`"));
        }
        for part in &parts {
            let valid = !part.is_empty()
                && part.len() <= 64
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
                && !part.bytes().all(|b| b.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "{name:?}: a table name is `table` or `schema.table`, each 1 to 64 ASCII \
                     letters, digits, `_` or `$`, not only digits"
                ));
            }
        }
        let quoted: Vec<String> = parts.iter().map(|p| format!("`{p}`")).collect();
        Ok(TableName {
            name: name.into(),
            quoted: quoted.join(".").into(),
        })
    }
}

/// `bytes` as a literal: `X'…'` (also right for no bytes: `X''`).
pub(super) fn push_hex(sql: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    sql.reserve(bytes.len() * 2 + 3);
    sql.push_str("X'");
    for &b in bytes {
        sql.push(char::from(DIGITS[usize::from(b >> 4)]));
        sql.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    sql.push('\'');
}

/// A duration in whole microseconds, rounded up, between 1 µs and 100 years.
pub(super) fn micros(d: Duration) -> u64 {
    let us = d.as_nanos().div_ceil(1_000);
    u64::try_from(us).unwrap_or(u64::MAX).clamp(1, MAX_MICROS)
}

/// The server's clock; every expiry is written and compared by it, never the client's.
const NOW: &str = "UTC_TIMESTAMP(6)";

/// The statements of one call, built for a table and namespace.
#[derive(Clone, Debug)]
pub(super) struct Sql {
    table: Box<str>,
    /// The namespace as a literal.
    namespace: Box<str>,
    /// The prepared statements' text, per kind and size, built once.
    shapes: Arc<Mutex<Shapes>>,
    /// The statement of `commit_in` (see [`Sql::commit_one`]).
    commit_one: Arc<str>,
}

/// What a row becomes when a batch records it: done (insert) or in flight (claim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Record {
    /// `Store::insert`: done, for the ttl.
    Done,
    /// `ClaimStore::claim`: in flight, for the lease.
    InFlight,
}

impl Record {
    /// The `done` column it writes.
    fn done(self) -> u8 {
        match self {
            Record::Done => 1,
            Record::InFlight => 0,
        }
    }
}

/// A prepared statement's kind, for the cache of shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Insert(Record),
    Returning(Record),
    Select(Record),
    /// [`Sql::commit_rows`].
    Commit,
}

/// Statement texts by kind and size.
type Shapes = HashMap<(Kind, usize), Arc<str>>;

/// The chunk sizes that statements are prepared for: a chunk is padded to the next (by
/// repeating its last key), so that a connection prepares at most a few dozen statements
/// whatever the batch sizes. The largest is the most keys per statement.
pub(super) const SHAPES: [usize; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1000];

/// The smallest shape that holds `n` keys (`n` at most the largest shape).
pub(super) fn shape_for(n: usize) -> usize {
    SHAPES
        .iter()
        .copied()
        .find(|&s| s >= n)
        .unwrap_or(SHAPES[SHAPES.len() - 1])
}

impl Sql {
    pub(super) fn new(table: &TableName, namespace: &[u8]) -> Sql {
        let mut ns = String::new();
        push_hex(&mut ns, namespace);
        Sql {
            table: table.quoted.clone(),
            namespace: ns.into(),
            shapes: Arc::default(),
            commit_one: commit_one(&table.quoted).into(),
        }
    }

    /// The table's DDL for this table.
    pub(super) fn create_table(&self) -> String {
        DDL.replace("{table}", &self.table)
    }

    /// A statement that fails unless the table has the columns this store uses.
    pub(super) fn check_table(&self) -> String {
        format!(
            "SELECT namespace, k, token, done, expires_at FROM {} LIMIT 0",
            self.table
        )
    }

    /// Bytes of SQL a chunk of `keys` needs, about: each key is written twice in hex.
    pub(super) fn estimate(&self, keys: usize, key_bytes: usize) -> usize {
        512 + keys * (2 * self.namespace.len() + 80) + 4 * key_bytes
    }

    /// Records the absent (or expired) keys of one chunk of `n` keys (a size of
    /// [`SHAPES`]: the statement is prepared once per shape and connection, then only its
    /// parameters are sent): `INSERT … ON DUPLICATE KEY UPDATE` with parameters (namespace,
    /// key, token, µs to expiry) per row, then the token twice and the µs again. Each key gets a
    /// row `(namespace, k, token, done, now + ttl)` unless it has a live row (`expires_at >
    /// now`); a live row is left as it is, whoever holds it. The keys must be sorted (locks
    /// are taken in key order, so two batches never deadlock on each other); a chunk shorter
    /// than its shape repeats its last key, which changes nothing.
    pub(super) fn record_insert(&self, record: Record, n: usize) -> Arc<str> {
        self.shape(Kind::Insert(record), n, || self.upsert(record, n))
    }

    /// [`record_insert`](Sql::record_insert) that also answers, in the same round trip, for
    /// each of its `n` rows (`RETURNING`, MariaDB 10.5+): the key when its row is another
    /// request's after the statement (another token, or the other state), `NULL` when it is
    /// this request's; and `done`. One more parameter after those of `record_insert`: the
    /// token.
    pub(super) fn record_returning(&self, record: Record, n: usize) -> Arc<str> {
        self.shape(Kind::Returning(record), n, || {
            let mut sql = self.upsert(record, n);
            let _ = write!(
                sql,
                " RETURNING IF(token = ? AND done = {}, NULL, k), done",
                record.done()
            );
            sql
        })
    }

    /// The text of [`record_insert`](Sql::record_insert).
    fn upsert(&self, record: Record, n: usize) -> String {
        let done = record.done();
        let mut sql = format!(
            "INSERT INTO {} (namespace, k, token, done, expires_at) VALUES ",
            self.table
        );
        let row = format!("(?, ?, ?, {done}, {NOW} + INTERVAL ? MICROSECOND)");
        sql.reserve(n * (row.len() + 1) + 256);
        for i in 0..n {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&row);
        }
        // A row is taken only when expired; the conditions read `expires_at`, written
        // last, so the assignments agree whether MariaDB evaluates them in order or
        // simultaneously. A live row that is not this request's (another token, or the
        // other state) is left as it is, and sets `LAST_INSERT_ID(1)`: the statement's
        // reply then carries 1 as its insert id (0 when no row did), and only then are the
        // rows read back (or, with `RETURNING`, the rows it answers are read).
        let _ = write!(
            sql,
            " ON DUPLICATE KEY UPDATE \
             token = IF(expires_at <= {NOW}, ?, token), \
             done = IF(expires_at <= {NOW}, {done}, \
             IF(token = ? AND done = {done}, done, done + 0 * LAST_INSERT_ID(1))), \
             expires_at = IF(expires_at <= {NOW}, {NOW} + INTERVAL ? MICROSECOND, expires_at)"
        );
        sql
    }

    /// Reads back the rows of a chunk of `n` keys after an upsert that flagged a live row of
    /// another request: each row's key, `done`, and whether it holds this request's token in
    /// the state it wrote (then the upsert wrote it: nobody else writes this token).
    /// Parameters: the token, the namespace, the keys.
    pub(super) fn record_select(&self, record: Record, n: usize) -> Arc<str> {
        self.shape(Kind::Select(record), n, || {
            let mut sql = format!(
                "SELECT k, done, token = ? AND done = {} FROM {} WHERE namespace = ? AND k IN (",
                record.done(),
                self.table
            );
            for i in 0..n {
                sql.push_str(if i == 0 { "?" } else { ",?" });
            }
            sql.push(')');
            sql
        })
    }

    /// Marks one key done for a ttl (`commit_in`, in the caller's transaction): one prepared
    /// statement, `INSERT … ON DUPLICATE KEY UPDATE`. Parameters: the namespace, the key, the
    /// token, the µs of the ttl, then the token four times and the µs again. A row held by
    /// the token (in flight or done), a row that expired, or no row at all becomes `(token,
    /// done, now + ttl)`; a live row of another token is left as it is and sets
    /// `LAST_INSERT_ID(1)`: the reply's insert id is 1 when the key was refused, 0 when it was
    /// marked (the table has no `AUTO_INCREMENT` column, so an insert id is only ever one that
    /// this statement set).
    pub(super) fn commit_one(&self) -> &str {
        &self.commit_one
    }

    /// [`commit_one`](Sql::commit_one) for a chunk of `n` keys held by one token (a size of
    /// [`SHAPES`], padded by repeating the last key, which changes nothing): the parameters
    /// (namespace, key, token, µs of the ttl) per row, then the token four times and the µs.
    /// The reply's insert id is 1 when any key was refused, 0 when every one was marked.
    pub(super) fn commit_rows(&self, n: usize) -> Arc<str> {
        self.shape(Kind::Commit, n, || commit_rows(&self.table, n))
    }

    /// The statement of `kind` for `n` keys, built once.
    fn shape(&self, kind: Kind, n: usize, build: impl FnOnce() -> String) -> Arc<str> {
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(shapes.entry((kind, n)).or_insert_with(|| build().into()))
    }

    /// Marks keys done for `ttl`, per group of keys held by one token: a row held by the
    /// group's token (in flight or done), a row that expired, or no row at all becomes
    /// `(token, done, now + ttl)`; a live row of another token is left alone and read back
    /// (refused). No `BEGIN`/`COMMIT`: the caller wraps the statements in a transaction, or
    /// runs them in its own. Each group's keys must be sorted.
    pub(super) fn commit(&self, groups: &[(Token, Vec<&[u8]>)], ttl: Duration) -> String {
        let keys: usize = groups.iter().map(|(_, ks)| ks.len()).sum();
        let bytes: usize = groups
            .iter()
            .flat_map(|(_, ks)| ks.iter().map(|k| k.len()))
            .sum();
        let mut sql = String::with_capacity(self.estimate(keys, bytes));
        let _ = writeln!(
            sql,
            "SET @stream_dedup_expires = {NOW} + INTERVAL {} MICROSECOND;",
            micros(ttl)
        );
        for (token, keys) in groups {
            let mut t = String::with_capacity(36);
            push_hex(&mut t, &token.to_bytes());
            self.insert_rows(&mut sql, keys, &t, 1, "@stream_dedup_expires");
            // `done` first (its condition reads the old token and expiry), then `token` (its
            // own old value and the old expiry), then `expires_at`: in either evaluation order
            // the condition is the same ("held by this token, or expired") for each.
            let _ = write!(
                sql,
                " ON DUPLICATE KEY UPDATE \
                 done = IF(token = {t} OR expires_at <= {NOW}, 1, done), \
                 token = IF(token = {t} OR expires_at <= {NOW}, {t}, token), \
                 expires_at = IF(token = {t} OR expires_at <= {NOW}, \
                 @stream_dedup_expires, expires_at);"
            );
            let _ = write!(sql, "\nSELECT k FROM {} WHERE namespace = ", self.table);
            sql.push_str(&self.namespace);
            sql.push_str(" AND k IN ");
            push_list(&mut sql, keys);
            let _ = writeln!(sql, " AND token <> {t} FOR UPDATE;");
        }
        sql
    }

    /// Deletes the rows of `keys` that each group's token holds: in flight only (a release),
    /// or in flight or done (a take-back).
    pub(super) fn release(&self, groups: &[(Token, Vec<&[u8]>)], in_flight_only: bool) -> String {
        let mut sql = String::new();
        for (token, keys) in groups {
            let _ = write!(sql, "DELETE FROM {} WHERE namespace = ", self.table);
            sql.push_str(&self.namespace);
            sql.push_str(" AND token = ");
            push_hex(&mut sql, &token.to_bytes());
            if in_flight_only {
                sql.push_str(" AND done = 0");
            }
            sql.push_str(" AND k IN ");
            push_list(&mut sql, keys);
            sql.push_str(";\n");
        }
        sql
    }

    /// Extends to `now + lease` the rows of `keys` that each group's token holds in flight
    /// and live, then reads back the keys it extended, with their tokens. No `BEGIN`/`COMMIT`: the caller wraps
    /// the statements in a transaction. Each group's keys must be sorted.
    pub(super) fn renew(&self, groups: &[(Token, Vec<&[u8]>)], lease: Duration) -> String {
        let mut sql = String::new();
        let _ = writeln!(
            sql,
            "SET @stream_dedup_expires = {NOW} + INTERVAL {} MICROSECOND;",
            micros(lease)
        );
        for (token, keys) in groups {
            let mut t = String::with_capacity(36);
            push_hex(&mut t, &token.to_bytes());
            let mut list = String::new();
            push_list(&mut list, keys);
            let held = format!(
                "namespace = {ns} AND token = {t} AND done = 0 AND k IN {list}",
                ns = self.namespace
            );
            let _ = writeln!(
                sql,
                "UPDATE {table} SET expires_at = @stream_dedup_expires \
                 WHERE {held} AND expires_at > {NOW};\n\
                 SELECT k, token FROM {table} WHERE {held} AND expires_at = @stream_dedup_expires;",
                table = self.table
            );
        }
        sql
    }

    /// Deletes the rows of `keys`, whatever they hold.
    pub(super) fn remove(&self, keys: &[&[u8]]) -> String {
        let bytes = keys.iter().map(|k| k.len()).sum();
        let mut sql = String::with_capacity(self.estimate(keys.len(), bytes) / 2);
        let _ = write!(sql, "DELETE FROM {} WHERE namespace = ", self.table);
        sql.push_str(&self.namespace);
        sql.push_str(" AND k IN ");
        push_list(&mut sql, keys);
        sql
    }

    /// Deletes at most `limit` expired rows, of any namespace.
    pub(super) fn purge(&self, limit: usize) -> String {
        format!(
            "DELETE FROM {} WHERE expires_at <= {NOW} LIMIT {limit}",
            self.table
        )
    }

    /// `INSERT INTO table (…) VALUES (…), …` for `keys`, with one token, state and expiry.
    fn insert_rows(&self, sql: &mut String, keys: &[&[u8]], token: &str, done: u8, expiry: &str) {
        let _ = write!(
            sql,
            "INSERT INTO {} (namespace, k, token, done, expires_at) VALUES ",
            self.table
        );
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            sql.push_str(&self.namespace);
            sql.push(',');
            push_hex(sql, key);
            let _ = write!(sql, ",{token},{done},{expiry})");
        }
    }
}

/// The text of [`Sql::commit_one`] for the quoted `table`.
fn commit_one(table: &str) -> String {
    commit_rows(table, 1)
}

/// [`Sql::commit_rows`]'s text.
fn commit_rows(table: &str, n: usize) -> String {
    // `done` first (its condition reads the old token and expiry), then `token` (its own old
    // value and the old expiry), then `expires_at`: whether MariaDB evaluates the assignments
    // in order or simultaneously, each condition is "held by this token, or expired". Only
    // the refusal calls `LAST_INSERT_ID(1)` (`IF` evaluates the branch it takes only).
    let mine = format!("token = ? OR expires_at <= {NOW}");
    let row = format!("(?, ?, ?, 1, {NOW} + INTERVAL ? MICROSECOND)");
    let rows = vec![row.as_str(); n].join(", ");
    format!(
        "INSERT INTO {table} (namespace, k, token, done, expires_at) \
         VALUES {rows} \
         ON DUPLICATE KEY UPDATE \
         done = IF({mine}, 1, done + 0 * LAST_INSERT_ID(1)), \
         token = IF({mine}, ?, token), \
         expires_at = IF({mine}, {NOW} + INTERVAL ? MICROSECOND, expires_at)"
    )
}

/// `(X'…', X'…', …)`.
fn push_list(sql: &mut String, keys: &[&[u8]]) {
    sql.push('(');
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        push_hex(sql, key);
    }
    sql.push(')');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals() {
        let mut s = String::new();
        push_hex(&mut s, b"");
        push_hex(&mut s, &[0x00, 0xff, b'\'', b'\\']);
        assert_eq!(s, "X''X'00ff275c'");
    }

    #[test]
    fn table_names_are_checked() {
        let t = TableName::parse("stream_dedup_keys").unwrap();
        assert_eq!(&*t.quoted, "`stream_dedup_keys`");
        let t = TableName::parse("app.dedup$2").unwrap();
        assert_eq!(&*t.quoted, "`app`.`dedup$2`");
        for bad in [
            "",
            "a.b.c",
            "a b",
            "a`b",
            "x;DROP TABLE y",
            "123",
            ".t",
            "t.",
            "é",
            &"t".repeat(65),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunks_are_padded_to_a_few_shapes() {
        assert_eq!(shape_for(1), 1);
        assert_eq!(shape_for(3), 4);
        assert_eq!(shape_for(513), 768);
        assert_eq!(shape_for(1000), 1000);
        assert!(SHAPES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn durations_are_rounded_up_and_bounded() {
        assert_eq!(micros(Duration::ZERO), 1);
        assert_eq!(micros(Duration::from_nanos(1_001)), 2);
        assert_eq!(micros(Duration::from_secs(1)), 1_000_000);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
    }

    #[test]
    fn statements_name_the_table_namespace_and_keys() {
        let table = TableName::parse("t").unwrap();
        let sql = Sql::new(&table, b"ns");
        let keys: [&[u8]; 2] = [b"a", b""];
        let token = Token::from_u128(1);
        let s = sql.record_insert(Record::InFlight, 2);
        assert!(s.starts_with("INSERT INTO `t` (namespace, k, token, done, expires_at) VALUES (?, ?, ?, 0, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND),(?, "), "{s}");
        assert_eq!(s.matches('?').count(), 2 * 4 + 3);
        assert!(s.contains("LAST_INSERT_ID(1)"), "{s}");
        assert!(Arc::ptr_eq(&s, &sql.record_insert(Record::InFlight, 2)));
        let r = sql.record_returning(Record::InFlight, 2);
        assert!(r.starts_with(&*s), "{r}");
        assert!(
            r.ends_with(" RETURNING IF(token = ? AND done = 0, NULL, k), done"),
            "{r}"
        );
        let s = sql.record_select(Record::Done, 3);
        assert!(
            s.starts_with("SELECT k, done, token = ? AND done = 1 FROM `t`"),
            "{s}"
        );
        assert!(s.ends_with("k IN (?,?,?)"), "{s}");
        let s = sql.commit(&[(token, keys.to_vec())], Duration::from_secs(1));
        assert!(
            s.contains("(X'6e73',X'61',X'00000000000000000000000000000001',1,"),
            "{s}"
        );
        assert!(s.contains("k IN (X'61',X'')"), "{s}");
        assert!(s.contains("INTERVAL 1000000 MICROSECOND"), "{s}");
        let s = sql.commit_one();
        assert!(s.starts_with("INSERT INTO `t` (namespace, k, token, done, expires_at) VALUES (?, ?, ?, 1, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) ON DUPLICATE KEY UPDATE done = IF(token = ? OR "), "{s}");
        assert_eq!(s.matches('?').count(), 9);
        assert_eq!(s.matches("LAST_INSERT_ID(1)").count(), 1);
        let s = sql.release(&[(token, keys.to_vec())], true);
        assert!(s.contains("DELETE FROM `t` WHERE namespace = X'6e73' AND token = X'"));
        assert_eq!(
            sql.purge(10),
            "DELETE FROM `t` WHERE expires_at <= UTC_TIMESTAMP(6) LIMIT 10"
        );
    }
}
