//! The store's SQL: the table, its statements, and the limits PostgreSQL puts on a key.
//!
//! Every statement is built once per store (the table name is part of its text) and sent as a
//! prepared statement, which sqlx caches per connection.

use std::time::Duration;

/// The default table.
pub(super) const DEFAULT_TABLE: &str = "stream_dedup_keys";

/// PostgreSQL's longest identifier (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;

/// The suffix of the purge index's name.
const INDEX_SUFFIX: &str = "_purge_at";

/// The table's fill factor: room in each page for the new versions of its rows, so that a
/// commit or a renewal, which changes no indexed column, is a HOT update (no index entry, a
/// fifth of the WAL, the old version pruned in place instead of left to vacuum).
const FILLFACTOR: u32 = 80;

/// The longest ttl or lease sent (100 years): far inside `timestamptz`'s range.
const MAX_MICROS: i64 = 100 * 365 * 24 * 3600 * 1_000_000;

/// Why a table name was refused (the builder panics with it).
pub(super) fn check_table(name: &str) -> Result<(), String> {
    let mut parts = name.split('.');
    let (schema, table) = match (parts.next(), parts.next(), parts.next()) {
        (Some(table), None, _) => (None, table),
        (Some(schema), Some(table), None) => (Some(schema), table),
        _ => return Err(format!("{name:?} has more than one `.`")),
    };
    let word = |part: &str, max: usize| {
        let mut chars = part.chars();
        let first = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !(first && rest) {
            Err(format!(
                "{part:?} is not a lowercase identifier ([a-z_][a-z0-9_]*)"
            ))
        } else if part.len() > max {
            Err(format!("{part:?} is longer than {max} bytes"))
        } else {
            Ok(())
        }
    };
    if let Some(schema) = schema {
        word(schema, MAX_IDENTIFIER)?;
    }
    // Room for the index's name, which PostgreSQL would otherwise cut short.
    word(table, MAX_IDENTIFIER - INDEX_SUFFIX.len())
}

/// The statements of one table, built once. `$1` is always the namespace.
#[derive(Debug)]
pub(super) struct Statements {
    /// The table as written in SQL: `"schema"."table"` or `"table"`.
    pub(super) table: String,
    /// `CREATE TABLE IF NOT EXISTS` and its index.
    pub(super) create: [String; 2],
    /// Reads no row; fails unless the table has the store's columns.
    pub(super) check: String,
    /// `$2` keys (sorted, distinct), `$3` token, `$4` ttl in µs, `$5` 0 → the keys recorded
    /// by it.
    pub(super) insert: String,
    /// `$2` keys (sorted, distinct), `$3` token, `$4` lease in µs, `$5` the ttl their commit
    /// will give in µs (0 if unknown) → the keys claimed by it.
    pub(super) claim: String,
    /// `$2` keys → rows `(key, done and live)` of those present.
    pub(super) states: String,
    /// `$2` keys (sorted, distinct), `$3` their tokens, `$4` ttl in µs → the keys committed.
    pub(super) commit: String,
    /// `$2` key, `$3` token, `$4` ttl in µs → a row if committed.
    pub(super) commit_one: String,
    /// `$2` keys, `$3` their tokens → nothing.
    pub(super) release: String,
    /// `$2` keys, `$3` their tokens → nothing (in flight or done).
    pub(super) take_back: String,
    /// `$2` keys (distinct), `$3` their tokens, `$4` lease in µs → the keys renewed.
    pub(super) renew: String,
    /// `$2` keys → nothing.
    pub(super) remove: String,
    /// `$1` the most rows → how many expired rows were deleted (no namespace: every one's).
    pub(super) purge: String,
}

impl Statements {
    /// The statements for `name` (already checked by [`check_table`]).
    pub(super) fn new(name: &str) -> Statements {
        let (schema, bare) = match name.split_once('.') {
            Some((schema, bare)) => (Some(schema), bare),
            None => (None, name),
        };
        let t = match schema {
            Some(schema) => format!("\"{schema}\".\"{bare}\""),
            None => format!("\"{bare}\""),
        };
        let index = format!("\"{bare}{INDEX_SUFFIX}\"");
        // A row that expired counts as absent: the batch takes it. A row that holds the
        // batch's token (a retry) is written again, so that it is returned too. Any other row
        // is left as it is (locked until the statement ends, not rewritten) and not returned.
        // `purge_at`, the purge's indexed column, is never before `expires_at`: a claim sets it
        // past the lease and the ttl its commit will give, so that the commit (and renewals
        // within the ttl) leave it as it is, and are HOT updates.
        let upsert = |done: &str, retry: &str| {
            format!(
                "INSERT INTO {t} AS d (namespace, key, token, done, expires_at, purge_at) \
                 SELECT $1, k, $3::uuid, {done}, n.e, n.e + $5::int8 * interval '1 microsecond' \
                 FROM unnest($2::bytea[]) AS k, \
                 (SELECT clock_timestamp() + $4::int8 * interval '1 microsecond' AS e) AS n \
                 ORDER BY k \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET token = excluded.token, done = excluded.done, expires_at = excluded.expires_at, \
                 purge_at = greatest(d.purge_at, excluded.purge_at) \
                 WHERE d.expires_at <= clock_timestamp() OR (d.token = excluded.token AND {retry}) \
                 RETURNING key"
            )
        };
        // Rows locked in key order (the `ORDER BY` runs below the lock), as the upserts do.
        let delete = |condition: &str| {
            format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
                   SELECT d.ctid FROM {t} AS d \
                   JOIN unnest($2::bytea[]{tokens}) AS u(k{token}) ON d.key = u.k \
                   WHERE d.namespace = $1{condition} ORDER BY d.key FOR UPDATE OF d))",
                tokens = if condition.is_empty() {
                    ""
                } else {
                    ", $3::uuid[]"
                },
                token = if condition.is_empty() { "" } else { ", t" },
            )
        };
        Statements {
            create: [
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\n    \
                       namespace  text        NOT NULL,\n    \
                       key        bytea       NOT NULL,\n    \
                       token      uuid        NOT NULL,\n    \
                       done       boolean     NOT NULL,\n    \
                       expires_at timestamptz NOT NULL,\n    \
                       purge_at   timestamptz NOT NULL,\n    \
                       PRIMARY KEY (namespace, key)\n\
                     ) WITH (fillfactor = {FILLFACTOR})"
                ),
                format!("CREATE INDEX IF NOT EXISTS {index} ON {t} (purge_at)"),
            ],
            check: format!(
                "SELECT namespace, key, token, done, expires_at, purge_at FROM {t} WHERE false"
            ),
            insert: upsert("true", "d.done"),
            claim: upsert("false", "NOT d.done"),
            states: format!(
                "SELECT key, done AND expires_at > clock_timestamp() FROM {t} \
                 WHERE namespace = $1 AND key = ANY($2::bytea[])"
            ),
            // A commit leaves `purge_at` as it is when the claim's covers the new expiry (a
            // commit within the ttl the claim was told): a HOT update.
            commit: format!(
                "INSERT INTO {t} AS d (namespace, key, token, done, expires_at, purge_at) \
                 SELECT $1, u.k, u.t, true, n.e, n.e \
                 FROM unnest($2::bytea[], $3::uuid[]) AS u(k, t), \
                 (SELECT clock_timestamp() + $4::int8 * interval '1 microsecond' AS e) AS n \
                 ORDER BY u.k \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET token = excluded.token, done = true, expires_at = excluded.expires_at, \
                 purge_at = greatest(d.purge_at, excluded.purge_at) \
                 WHERE d.token = excluded.token OR d.expires_at <= clock_timestamp() \
                 RETURNING key"
            ),
            commit_one: format!(
                "INSERT INTO {t} AS d (namespace, key, token, done, expires_at, purge_at) \
                 SELECT $1, $2, $3::uuid, true, n.e, n.e \
                 FROM (SELECT clock_timestamp() + $4::int8 * interval '1 microsecond' AS e) AS n \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET token = excluded.token, done = true, expires_at = excluded.expires_at, \
                 purge_at = greatest(d.purge_at, excluded.purge_at) \
                 WHERE d.token = excluded.token OR d.expires_at <= clock_timestamp() \
                 RETURNING true"
            ),
            release: delete(" AND d.token = u.t AND NOT d.done"),
            take_back: delete(" AND d.token = u.t"),
            // Rows locked in key order, as everywhere; a lease that ran out is not renewed
            // (the key is free: another claim may take it).
            renew: format!(
                "UPDATE {t} AS r SET expires_at = n.e, purge_at = greatest(r.purge_at, n.e) \
                 FROM (SELECT clock_timestamp() + $4::int8 * interval '1 microsecond' AS e) AS n \
                 WHERE r.ctid = ANY(ARRAY(\
                   SELECT d.ctid FROM {t} AS d \
                   JOIN unnest($2::bytea[], $3::uuid[]) AS u(k, t) ON d.key = u.k \
                   WHERE d.namespace = $1 AND d.token = u.t AND NOT d.done \
                   AND d.expires_at > clock_timestamp() ORDER BY d.key FOR UPDATE OF d)) \
                 RETURNING r.key"
            ),
            remove: delete(""),
            // `statement_timestamp()`, not `clock_timestamp()`: a stable value bounds the index
            // scan, where a volatile one would be a filter over the whole index. `SKIP LOCKED`:
            // the purges of several consumers never wait for each other, nor for a batch.
            // `expires_at` as well: never later than `purge_at`, checked all the same.
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
                   SELECT ctid FROM {t} WHERE purge_at < statement_timestamp() \
                   AND expires_at < statement_timestamp() \
                   ORDER BY purge_at LIMIT $1 FOR UPDATE SKIP LOCKED))"
            ),
            table: t,
        }
    }
}

/// A ttl or lease in whole microseconds, rounded up, between 0 and 100 years.
pub(super) fn micros(d: Duration) -> i64 {
    let us = d.as_nanos().div_ceil(1_000);
    i64::try_from(us).unwrap_or(i64::MAX).min(MAX_MICROS)
}

/// The longest key for a namespace of `namespace_len` bytes on a server with pages of
/// `block_size` bytes: the primary key's index row (`namespace`, `key`) must fit in a btree
/// page's limit for one row (`BTMaxItemSize`: 2,704 bytes with 8 KiB pages), whatever the
/// key's bytes (a compressible key might fit beyond; the limit does not count on it).
///
/// The index row: an 8-byte header; the namespace with a 1-byte length (4 bytes, aligned, over
/// 126 bytes); the key with a 4-byte length aligned to 4; the whole aligned to 8.
pub(super) fn max_key_len(namespace_len: usize, block_size: usize) -> usize {
    // BTMaxItemSize: a third of a page less its header, three line pointers and btree's special
    // space, aligned down to 8, less room for a heap TID (PostgreSQL 12 and later).
    let page_header = (24 + 3 * 4usize).next_multiple_of(8);
    let special = 16;
    let item_max = (block_size.saturating_sub(page_header + special) / 3) / 8 * 8;
    let item_max = item_max.saturating_sub(8);
    let namespace_header = if namespace_len <= 126 { 1 } else { 4 };
    let before_key = (8 + namespace_header + namespace_len).next_multiple_of(4) + 4;
    item_max.saturating_sub(before_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_limits_match_postgres() {
        // Found on PostgreSQL 15 (8 KiB pages) by inserting random keys of growing length.
        let measured = [
            (0, 2688),
            (1, 2688),
            (3, 2688),
            (4, 2684),
            (5, 2684),
            (8, 2680),
            (16, 2672),
            (63, 2628),
            (100, 2588),
            (126, 2564),
            (127, 2560),
            (128, 2560),
            (200, 2488),
            (255, 2432),
        ];
        for (namespace, key) in measured {
            assert_eq!(
                max_key_len(namespace, 8192),
                key,
                "namespace of {namespace}"
            );
        }
    }

    #[test]
    fn table_names_are_checked() {
        for good in ["stream_dedup_keys", "_t1", "dedup.keys", "a"] {
            assert_eq!(check_table(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Keys",
            "1keys",
            "a.b.c",
            "keys;drop",
            "\"keys\"",
            ".keys",
            "keys.",
            "ключи",
            &"k".repeat(55),
        ] {
            assert!(check_table(bad).is_err(), "{bad}");
        }
        assert_eq!(check_table(&"k".repeat(54)), Ok(()));
    }

    #[test]
    fn statements_name_the_table() {
        let s = Statements::new("dedup.keys");
        assert_eq!(s.table, "\"dedup\".\"keys\"");
        assert!(
            s.create[1]
                .starts_with("CREATE INDEX IF NOT EXISTS \"keys_purge_at\" ON \"dedup\".\"keys\"")
        );
        assert!(s.release.contains("AND d.token = u.t AND NOT d.done"));
        assert!(!s.remove.contains("$3"));
    }

    #[test]
    fn durations_become_microseconds() {
        assert_eq!(micros(Duration::ZERO), 0);
        assert_eq!(micros(Duration::from_nanos(1)), 1);
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
    }
}
