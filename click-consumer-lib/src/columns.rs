//! The table's layout: which columns the consumer writes, read from `system.columns` at
//! start-up, every [`REFRESH_EVERY`] while running, and again when an INSERT fails on the
//! table's shape, so a column added or dropped with `ALTER TABLE` is picked up without a
//! restart.
//!
//! Besides the six contract columns, every other column of a type the consumer can
//! write ([`ColumnType`]) is an *extra* column, filled from the top-level JSON field of
//! the same name. `MATERIALIZED` and `ALIAS` columns, and columns of other types that
//! have a `DEFAULT`, are left to the server. A column of another type without a default
//! cannot be filled: start-up stops with [`Error::TableShape`] naming it.
//!
//! A batch is encoded with one [`Shape`]: a layout and the extra columns the batch
//! writes. An extra column with a `DEFAULT` is written only once a message of the batch
//! names it, so the server keeps filling its default for batches that never do.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use clickhouse::Row;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::event::COLUMNS;
use crate::field::ColumnType;
use crate::store::Store;

/// How often a running consumer reads the table's columns again.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// One extra column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Extra {
    pub(crate) name: String,
    /// As `system.columns` spells it, for reasons.
    pub(crate) type_name: String,
    pub(crate) ty: ColumnType,
    /// The column has a `DEFAULT` expression.
    pub(crate) has_default: bool,
}

/// The columns the consumer writes, contract columns first.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Layout {
    pub(crate) extras: Vec<Extra>,
    /// The server takes `RowBinaryWithDefaults` (a per-value "use the default" flag).
    pub(crate) with_defaults: bool,
}

impl Layout {
    /// The index of the extra column `name`.
    pub(crate) fn extra(&self, name: &str) -> Option<usize> {
        self.extras.iter().position(|c| c.name == name)
    }

    /// Builds the layout from `system.columns` rows; the contract columns must be there
    /// with compatible types (checked by `Store::check_table`).
    fn from_columns(table: &str, columns: Vec<TableColumn>, with_defaults: bool) -> Result<Self> {
        let mut extras = Vec::new();
        for column in columns {
            if COLUMNS.iter().any(|(name, _)| *name == column.name) {
                continue;
            }
            match column.default_kind.as_str() {
                "MATERIALIZED" | "ALIAS" | "EPHEMERAL" => continue,
                _ => {}
            }
            let has_default = column.default_kind == "DEFAULT";
            match ColumnType::parse(&column.r#type) {
                Some(ty) => extras.push(Extra {
                    name: column.name,
                    type_name: column.r#type,
                    ty,
                    has_default,
                }),
                None if has_default => {
                    log::debug!(
                        "column `{}` ({}) is left to its DEFAULT: the consumer does not write this type",
                        column.name,
                        column.r#type
                    );
                }
                None => {
                    return Err(Error::TableShape {
                        table: table.to_owned(),
                        problem: format!(
                            "column `{}` has type {}, which the consumer cannot fill from JSON, and no DEFAULT: give it a DEFAULT or change its type",
                            column.name, column.r#type
                        ),
                    });
                }
            }
        }
        Ok(Layout {
            extras,
            with_defaults,
        })
    }

    /// Reads the table's columns and what the server supports.
    ///
    /// # Errors
    /// [`Error::ClickHouse`] when the query fails, [`Error::TableShape`] for a column the
    /// consumer can neither fill nor leave out.
    pub(crate) async fn read(store: &Store) -> Result<Layout> {
        let table = store.qualified_table();
        let client = store.client();
        let columns = client
            .query(
                "SELECT name, type, default_kind FROM system.columns WHERE database = ? AND table = ?",
            )
            .bind(store.database())
            .bind(store.table())
            .fetch_all::<TableColumn>()
            .await
            .map_err(|e| Error::clickhouse(format!("failed to read the columns of `{table}`"), e))?;
        // `system.formats` exists on 18.16 (without RowBinaryWithDefaults) and later.
        let with_defaults = client
            .query("SELECT count() FROM system.formats WHERE name = 'RowBinaryWithDefaults' AND is_input")
            .fetch_one::<u64>()
            .await
            .map_err(|e| Error::clickhouse("failed to read the server's input formats", e))?
            > 0;
        Layout::from_columns(&table, columns, with_defaults)
    }
}

#[derive(Row, Deserialize)]
struct TableColumn {
    name: String,
    r#type: String,
    default_kind: String,
}

/// The current layout, shared by the sessions (which encode) and the commits (which
/// re-read it when an INSERT fails on the table's shape).
#[derive(Debug, Default)]
pub(crate) struct Columns {
    current: RwLock<Arc<Layout>>,
}

impl Columns {
    pub(crate) fn current(&self) -> Arc<Layout> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the layout again; returns it, and whether it changed.
    ///
    /// # Errors
    /// As [`Layout::read`]; the current layout is kept.
    pub(crate) async fn refresh(&self, store: &Store) -> Result<(Arc<Layout>, bool)> {
        let fresh = Layout::read(store).await?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current == fresh {
            return Ok((current.clone(), false));
        }
        log::info!(
            "columns of {} filled from event fields: {}",
            store.qualified_table(),
            describe(&fresh)
        );
        *current = Arc::new(fresh);
        Ok((current.clone(), true))
    }
}

fn describe(layout: &Layout) -> String {
    if layout.extras.is_empty() {
        return "none besides the six contract columns".to_owned();
    }
    layout
        .extras
        .iter()
        .map(|c| format!("{} {}", c.name, c.type_name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Re-reads the layout every [`REFRESH_EVERY`] until dropped. Failures are logged and
/// the current layout is kept.
pub(crate) async fn keep_fresh(columns: Arc<Columns>, store: Store) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = columns.refresh(&store).await {
            log::warn!("could not read the table's columns again (keeping the last layout): {e}");
        }
    }
}

/// Whether an INSERT failed because a column it names is gone (dropped or renamed).
pub(crate) fn is_shape_error(error: &clickhouse::error::Error) -> bool {
    let clickhouse::error::Error::BadResponse(text) = error else {
        return false;
    };
    // NOT_FOUND_COLUMN_IN_BLOCK, NO_SUCH_COLUMN_IN_TABLE, UNKNOWN_IDENTIFIER
    [
        "Code: 10.",
        "Code: 16.",
        "Code: 47.",
        "Code: 10,",
        "Code: 16,",
        "Code: 47,",
    ]
    .iter()
    .any(|code| text.contains(code))
}

/// How one batch is encoded: a layout and the extra columns it writes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    pub(crate) layout: Arc<Layout>,
    /// Per extra column: written by this batch. Columns without a DEFAULT always are.
    pub(crate) written: Vec<bool>,
}

impl Shape {
    pub(crate) fn new(layout: Arc<Layout>) -> Self {
        let written = layout.extras.iter().map(|c| !c.has_default).collect();
        Shape { layout, written }
    }

    /// The INSERT statement for rows of this shape into `table`.
    pub(crate) fn insert_sql(&self, table: &str) -> String {
        let mut sql = format!("INSERT INTO {table} (");
        let names = COLUMNS.iter().map(|(name, _)| *name).chain(
            self.layout
                .extras
                .iter()
                .zip(&self.written)
                .filter(|(_, written)| **written)
                .map(|(c, _)| c.name.as_str()),
        );
        for (i, name) in names.enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(name);
        }
        sql.push_str(if self.layout.with_defaults {
            ") FORMAT RowBinaryWithDefaults"
        } else {
            ") FORMAT RowBinary"
        });
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, ty: &str, default_kind: &str) -> TableColumn {
        TableColumn {
            name: name.to_owned(),
            r#type: ty.to_owned(),
            default_kind: default_kind.to_owned(),
        }
    }

    fn contract() -> Vec<TableColumn> {
        COLUMNS
            .iter()
            .map(|(name, ty)| column(name, ty, ""))
            .collect()
    }

    #[test]
    fn the_python_table_has_no_extras_and_the_same_insert() {
        let layout = Layout::from_columns("db.t", contract(), false).unwrap();
        assert!(layout.extras.is_empty());
        assert_eq!(
            Shape::new(Arc::new(layout)).insert_sql("db.t"),
            "INSERT INTO db.t (short_code, timestamp, user_agent, ip_address, referrer, original_url) FORMAT RowBinary"
        );
    }

    #[test]
    fn extras_defaults_and_unsupported_types() {
        let mut columns = contract();
        columns.push(column("country", "LowCardinality(String)", ""));
        columns.push(column("created", "DateTime", "DEFAULT"));
        columns.push(column("day", "Date", "MATERIALIZED"));
        columns.push(column("alias", "String", "ALIAS"));
        columns.push(column("pair", "Tuple(UInt8, String)", "DEFAULT"));
        let layout = Layout::from_columns("db.t", columns, true).unwrap();
        let names: Vec<_> = layout.extras.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["country", "created"]);
        let mut shape = Shape::new(Arc::new(layout));
        assert_eq!(
            shape.insert_sql("db.t"),
            "INSERT INTO db.t (short_code, timestamp, user_agent, ip_address, referrer, original_url, country) FORMAT RowBinaryWithDefaults"
        );
        shape.written[1] = true;
        assert!(
            shape
                .insert_sql("db.t")
                .ends_with("country, created) FORMAT RowBinaryWithDefaults")
        );

        let mut columns = contract();
        columns.push(column("pair", "Tuple(UInt8, String)", ""));
        let err = Layout::from_columns("db.t", columns, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`pair`") && text.contains("Tuple(UInt8, String)"),
            "{text}"
        );
    }
}
