//! ClickHouse: the schema at start-up, and INSERTs of pre-encoded RowBinary batches.
//!
//! With several replicas in `CLICKHOUSE_URL`, statements go to the replica in use, and an
//! INSERT that fails transiently there is sent at once to the next (see `endpoints`).

use std::{
    hash::{BuildHasher, Hasher},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clickhouse::{Client, Row, error::Error as ChError};
use serde::Deserialize;

use crate::config::Config;
use crate::endpoints::{self, Endpoints, NodeGauge};
use crate::error::{Error, Result};
use crate::event::COLUMNS;

/// The table DDL. It lives in the crate (a published crate cannot include files outside
/// its folder); the workspace's `schema/click_events.sql` is a link to it.
const TABLE_DDL: &str = include_str!("../schema/click_events.sql");

/// Longest an INSERT may take before it counts as failed (and is retried).
const INSERT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any other statement may take (version, DDL, table check, probes).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How ClickHouse failed an INSERT, which decides what the consumer does next.
#[derive(Debug)]
pub(crate) enum InsertFailure {
    /// Down, overloaded, timing out: retry the same batch later.
    Transient(ChError),
    /// The data was refused: find the refused rows and dead-letter them.
    Rejected(ChError),
    /// Retrying cannot help (authentication, permissions, missing table): stop.
    Fatal(ChError),
}

/// A cheap-to-clone handle on the ClickHouse table.
#[derive(Clone)]
pub(crate) struct Store {
    replicas: Arc<Endpoints<Client>>,
    url: String,
    database: String,
    table: String,
    engine: String,
    on_cluster: String,
    /// What the server and the table offer against storing a retried INSERT twice.
    dedup: Arc<Dedup>,
}

/// Learnt at start-up from the server and the table.
#[derive(Debug, Default)]
struct Dedup {
    /// The server knows `insert_deduplication_token` (22.2 and later).
    token: AtomicBool,
    /// The table drops a block identical to one already inserted: Replicated* engines
    /// (`insert_deduplicate`, on by default).
    table: AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &endpoints::redact_list(&self.url))
            .field("table", &self.qualified_table())
            .finish_non_exhaustive()
    }
}

#[derive(Row, Deserialize)]
struct Column {
    name: String,
    r#type: String,
}

impl Store {
    /// # Errors
    /// [`Error::InvalidSetting`] if `CLICKHOUSE_CA_FILE` holds no usable certificate.
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let url = config.clickhouse_url();
        let base = match config.clickhouse_ca_pem()? {
            Some(pem) => crate::tls::client_trusting(&pem)?,
            None => Client::default(),
        };
        // Schema validation runs `DESCRIBE` with a setting ClickHouse 18.16 refuses; we
        // check the table ourselves at start-up instead (see `check_table`).
        let base = base
            .with_user(&config.clickhouse_user)
            .with_password(config.clickhouse_password.expose())
            .with_validation(false);
        let replicas = endpoints::split(&url)
            .into_iter()
            .map(|replica| {
                (
                    endpoints::node_name(replica),
                    base.clone().with_url(replica),
                )
            })
            .collect();
        let database = config.clickhouse_database.clone();
        let table = config.clickhouse_table.clone();
        let on_cluster = config
            .clickhouse_cluster
            .as_ref()
            .map_or_else(String::new, |cluster| format!("ON CLUSTER {cluster}"));
        Ok(Store {
            replicas: Arc::new(Endpoints::new("ClickHouse", replicas)),
            url,
            database,
            table,
            engine: config.clickhouse_table_engine.clone(),
            on_cluster,
            dedup: Arc::default(),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Exports the replica in use through `click_consumer_node_in_use`.
    pub(crate) fn report_to(&self, gauge: &NodeGauge) {
        self.replicas.report_to(gauge);
    }

    /// `host:port` of the replica in use.
    pub(crate) fn replica_in_use(&self) -> &str {
        self.replicas.in_use().1
    }

    /// The client of the replica in use.
    pub(crate) fn client(&self) -> &Client {
        self.replicas.in_use().2
    }

    /// Runs `op` on the replica in use, then on the next ones while it fails transiently;
    /// the replica that answers stays in use. Returns the last error.
    async fn on_some_replica<T, F, Fut>(&self, op: F) -> Result<T, ChError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ChError>>,
    {
        let mut index = self.replicas.current();
        let mut tries = 1;
        loop {
            match op(self.replicas.get(index).1.clone()).await {
                Err(e) if tries < self.replicas.len() && severity(&e) == Severity::Transient => {
                    index = self.replicas.advance(index, &e);
                    tries += 1;
                }
                result => return result,
            }
        }
    }

    pub(crate) fn qualified_table(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// A write that stores nothing: an INSERT of zero rows into the table. Unlike
    /// `SELECT 1` it fails when the table cannot be written: a read-only user or replica,
    /// too many parts, an exceeded quota. (A full disk only shows on a real write.)
    pub(crate) async fn write_probe(&self) -> Result<(), ChError> {
        let sql = format!(
            "INSERT INTO {} (short_code) SELECT '' WHERE 0",
            self.qualified_table()
        );
        self.on_some_replica(|client| {
            let sql = sql.clone();
            async move { timed(client.query(&sql).execute()).await }
        })
        .await
    }

    /// The server's version, for the start-up log.
    pub(crate) async fn version(&self) -> Result<String, ChError> {
        self.on_some_replica(|client| async move {
            timed(client.query("SELECT version()").fetch_one::<String>()).await
        })
        .await
    }

    /// Whether a retried INSERT of an identical block is dropped by ClickHouse when an
    /// earlier attempt was committed after all.
    pub(crate) fn deduplicates(&self) -> bool {
        self.dedup.table.load(Ordering::Relaxed)
    }

    /// Learns what the server and the table offer against duplicate retries.
    async fn learn_dedup(&self) -> Result<(), ChError> {
        let token = timed(
            self.client()
                .query(
                    "SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'",
                )
                .fetch_one::<u64>(),
        )
        .await?;
        let engine = timed(
            self.client()
                .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
                .bind(&self.database)
                .bind(&self.table)
                .fetch_all::<String>(),
        )
        .await?;
        let replicated = engine.first().is_some_and(|e| e.starts_with("Replicated"));
        self.dedup.token.store(token > 0, Ordering::Relaxed);
        self.dedup.table.store(replicated, Ordering::Relaxed);
        log::info!(
            "retried INSERTs: {} ({} engine{})",
            if replicated {
                "an identical retried block is dropped by ClickHouse"
            } else {
                "NOT deduplicated: an INSERT that timed out but was committed is stored again when retried"
            },
            engine.first().map_or("unknown", String::as_str),
            if token > 0 {
                ", with insert_deduplication_token"
            } else {
                ""
            }
        );
        Ok(())
    }

    /// Creates the database and the table when missing, then checks the table's columns.
    ///
    /// # Errors
    /// [`Error::ClickHouse`] when a statement fails, [`Error::TableShape`] when the table
    /// lacks a column or has one of another type.
    pub(crate) async fn ensure_schema(&self) -> Result<()> {
        // `ON CLUSTER` DDL waits for every host of the cluster: with the table already
        // there, a replica that is down must not hold up start-up.
        if !self.on_cluster.is_empty() && self.check_table().await.is_ok() {
            return Ok(());
        }
        let db = &self.database;
        let create_database = format!("CREATE DATABASE IF NOT EXISTS {db} {}", self.on_cluster);
        timed(self.client().query(&create_database).execute())
            .await
            .map_err(|e| Error::clickhouse(format!("failed to create database `{db}`"), e))?;
        timed(self.client().query(&self.table_ddl()).execute())
            .await
            .map_err(|e| {
                Error::clickhouse(
                    format!("failed to create table `{}`", self.qualified_table()),
                    e,
                )
            })?;
        self.check_table().await?;
        self.learn_dedup().await.map_err(|e| {
            Error::clickhouse(
                format!("failed to read the engine of `{}`", self.qualified_table()),
                e,
            )
        })
    }

    fn table_ddl(&self) -> String {
        TABLE_DDL
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("{database}", &self.database)
            .replace("{table}", &self.table)
            .replace("{on_cluster}", &self.on_cluster)
            // Last: the engine may hold ClickHouse macros such as {shard} and {replica}.
            .replace("{engine}", &self.engine)
    }

    /// Checks that every column the consumer writes exists with a compatible type.
    ///
    /// # Errors
    /// [`Error::TableShape`] naming the first mismatch.
    pub(crate) async fn check_table(&self) -> Result<()> {
        let columns = timed(
            self.client()
                .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
                .bind(&self.database)
                .bind(&self.table)
                .fetch_all::<Column>(),
        )
        .await
        .map_err(|e| {
            Error::clickhouse(
                format!("failed to read the columns of `{}`", self.qualified_table()),
                e,
            )
        })?;
        let shape_error = |problem: String| Error::TableShape {
            table: self.qualified_table(),
            problem,
        };
        if columns.is_empty() {
            return Err(shape_error("the table does not exist".to_owned()));
        }
        for (name, wanted) in COLUMNS {
            let Some(found) = columns.iter().find(|c| c.name == name) else {
                return Err(shape_error(format!(
                    "column `{name}` ({wanted}) is missing"
                )));
            };
            if !type_accepts(wanted, &found.r#type) {
                return Err(shape_error(format!(
                    "column `{name}` is {}, expected {wanted}",
                    found.r#type
                )));
            }
        }
        Ok(())
    }

    // --- Extra columns (`columns`): the layout is read through the client, and each
    // batch is inserted with its own column list.

    pub(crate) fn database(&self) -> &str {
        &self.database
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Sends one INSERT of pre-encoded rows, `sql` naming the columns and the format
    /// (`columns::Shape::insert_sql`), to the next replica as well if the one in use fails
    /// transiently. `Bytes` clones are free, so a retry re-sends the identical block, which
    /// a Replicated* table drops if an earlier attempt was committed after all; on servers
    /// that have it, `insert_deduplication_token` (a hash of the block) names the block too.
    pub(crate) async fn insert(&self, sql: String, rows: Bytes) -> Result<(), InsertFailure> {
        self.on_some_replica(|client| self.insert_into(client, sql.clone(), rows.clone()))
            .await
            .map_err(classify)
    }

    async fn insert_into(&self, client: Client, sql: String, rows: Bytes) -> Result<(), ChError> {
        let mut insert = client
            .insert_formatted_with(sql)
            .with_timeouts(Some(INSERT_TIMEOUT), Some(INSERT_TIMEOUT));
        if self.dedup.token.load(Ordering::Relaxed) {
            insert = insert.with_setting("insert_deduplication_token", dedup_token(&rows));
        }
        match insert.send(rows).await {
            Ok(()) => insert.end().await,
            Err(e) => Err(e),
        }
    }
}

/// A name for a block, the same for the same bytes.
fn dedup_token(rows: &[u8]) -> String {
    // Fixed keys: the token must be the same in every process and after a restart.
    let mut hasher =
        std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().build_hasher();
    hasher.write(rows);
    format!("click-consumer-{:016x}-{}", hasher.finish(), rows.len())
}

/// Runs a statement under [`QUERY_TIMEOUT`].
async fn timed<T>(query: impl Future<Output = Result<T, ChError>>) -> Result<T, ChError> {
    tokio::time::timeout(QUERY_TIMEOUT, query)
        .await
        .unwrap_or(Err(ChError::TimedOut))
}

/// Whether a failed INSERT may have been committed all the same (the answer was lost):
/// a timeout, or a connection that broke after it was made; not a refused connection.
pub(crate) fn is_ambiguous(error: &ChError) -> bool {
    match error {
        ChError::TimedOut => true,
        ChError::Network(source) => !source
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect),
        _ => false,
    }
}

/// RowBinary writes a `String` the same way into `String` and `LowCardinality(String)`,
/// and a `u32` into `DateTime` whatever its time zone.
fn type_accepts(wanted: &str, found: &str) -> bool {
    match wanted {
        "String" => found == "String" || found == "LowCardinality(String)",
        "DateTime" => found == "DateTime" || found.starts_with("DateTime('"),
        _ => found == wanted,
    }
}

/// ClickHouse error codes where retrying cannot help.
const FATAL_CODES: &[u32] = &[
    10,  // NOT_FOUND_COLUMN_IN_BLOCK
    16,  // NO_SUCH_COLUMN_IN_TABLE
    47,  // UNKNOWN_IDENTIFIER
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    73,  // UNKNOWN_FORMAT
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// ClickHouse error codes that mean "this data is refused".
const REJECTED_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    469, // VIOLATED_CONSTRAINT
];

/// How bad a ClickHouse error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    Transient,
    Rejected,
    Fatal,
}

pub(crate) fn severity(error: &ChError) -> Severity {
    let code = match error {
        ChError::BadResponse(text) => exception_code(text),
        ChError::Network(_) | ChError::TimedOut => return Severity::Transient,
        _ => return Severity::Fatal,
    };
    match code {
        Some(code) if FATAL_CODES.contains(&code) => Severity::Fatal,
        Some(code) if REJECTED_CODES.contains(&code) => Severity::Rejected,
        // Everything else (TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED, timeouts, a 5xx without
        // a code, codes we do not know) is retried: never lose a batch on a guess.
        _ => Severity::Transient,
    }
}

pub(crate) fn classify(error: ChError) -> InsertFailure {
    match severity(&error) {
        Severity::Transient => InsertFailure::Transient(error),
        Severity::Rejected => InsertFailure::Rejected(error),
        Severity::Fatal => InsertFailure::Fatal(error),
    }
}

/// The `Code: N` of a ClickHouse exception text.
fn exception_code(text: &str) -> Option<u32> {
    let start = text.find("Code: ")? + "Code: ".len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> &'static str {
        match classify(ChError::BadResponse(text.to_owned())) {
            InsertFailure::Transient(_) => "transient",
            InsertFailure::Rejected(_) => "rejected",
            InsertFailure::Fatal(_) => "fatal",
        }
    }

    #[test]
    fn errors_are_classified_by_code() {
        assert_eq!(
            kind("Code: 60. DB::Exception: Table db.t doesn't exist"),
            "fatal"
        );
        assert_eq!(
            kind("Code: 516. DB::Exception: default: Authentication failed"),
            "fatal"
        );
        assert_eq!(
            kind("Code: 252. DB::Exception: Too many parts (300)"),
            "transient"
        );
        assert_eq!(
            kind("Code: 241. DB::Exception: Memory limit exceeded"),
            "transient"
        );
        assert_eq!(
            kind("Code: 33. DB::Exception: Cannot read all data"),
            "rejected"
        );
        assert_eq!(
            kind("Code: 469. DB::Exception: Constraint `c` violated"),
            "rejected"
        );
        assert_eq!(kind("503 Service Unavailable"), "transient");
        assert!(matches!(
            classify(ChError::TimedOut),
            InsertFailure::Transient(_)
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_an_ambiguous_failure() {
        // Nothing listens on a port just released: the INSERT cannot have been committed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store =
            Store::new(&Config::default().with_clickhouse_url(format!("http://127.0.0.1:{port}")))
                .unwrap();
        match store
            .insert(
                "INSERT INTO t FORMAT RowBinary".to_owned(),
                Bytes::from_static(b"x"),
            )
            .await
        {
            Err(InsertFailure::Transient(e)) => assert!(!is_ambiguous(&e), "{e:?}"),
            other => panic!("expected a transient failure, got {other:?}"),
        }
        assert!(is_ambiguous(&ChError::TimedOut));
    }

    #[test]
    fn compatible_column_types() {
        assert!(type_accepts("String", "LowCardinality(String)"));
        assert!(type_accepts("DateTime", "DateTime('UTC')"));
        assert!(!type_accepts("DateTime", "DateTime64(3)"));
        assert!(!type_accepts("String", "Nullable(String)"));
        assert!(!type_accepts("DateTime", "UInt32"));
    }

    #[test]
    fn ddl_uses_the_configured_names() {
        let store = Store::new(
            &Config::default()
                .with_clickhouse_database("db1")
                .with_clickhouse_table("t1"),
        )
        .unwrap();
        let ddl = store.table_ddl();
        assert!(
            ddl.starts_with("CREATE TABLE IF NOT EXISTS db1.t1"),
            "{ddl}"
        );
        assert!(ddl.contains("ENGINE = MergeTree()"), "{ddl}");
        assert!(!ddl.contains("--"), "comments are stripped: {ddl}");
        assert!(!ddl.contains("ON CLUSTER"), "{ddl}");
        let clustered = Store::new(
            &Config::default()
                .with_clickhouse_cluster("analytics")
                .with_clickhouse_table_engine(
                    "ReplicatedMergeTree('/clickhouse/tables/{shard}/t', '{replica}')",
                ),
        )
        .unwrap();
        let ddl = clustered.table_ddl();
        assert!(
            ddl.contains("url_shortener.click_events ON CLUSTER analytics"),
            "{ddl}"
        );
        assert!(
            ddl.contains(
                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/t', '{replica}')"
            ),
            "ClickHouse macros are kept: {ddl}"
        );
    }
}
