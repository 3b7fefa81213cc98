//! The `--extra-columns` scenario (issue 13): the table has ten typed columns besides the
//! six contract ones, and every click carries the ten fields that fill them, so the
//! drain measures decoding, type checks and typed encoding. The reference consumer
//! drains the same bodies.

use std::sync::atomic::{AtomicBool, Ordering};

use click_consumer::ClickPublisher;
use click_consumer_testkit::ClickHouse;
use serde_json::{Value, json};

use crate::events;
use crate::table::Table;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the scenario on for this run (`--extra-columns`).
pub(crate) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The ten extra columns, added to the consumer's table before the drain (all exist on
/// ClickHouse 18.16).
const COLUMNS: &str = "ADD COLUMN country String, \
    ADD COLUMN device Enum8('desktop' = 1, 'mobile' = 2, 'tablet' = 3, 'bot' = 4), \
    ADD COLUMN campaign String, ADD COLUMN user_id UInt64, ADD COLUMN is_bot UInt8, \
    ADD COLUMN click_id UUID, ADD COLUMN dwell_ms Nullable(UInt32), ADD COLUMN score Float32, \
    ADD COLUMN tags Array(String), ADD COLUMN first_seen DateTime";

const COUNTRIES: &[&str] = &["US", "DE", "IN", "BR", "GB", "FR", "JP", "NO", "", "ZA"];
const DEVICES: &[&str] = &["desktop", "mobile", "mobile", "tablet", "bot"];
const TAGS: &[&str] = &["promo", "winter", "email", "social", "ads"];

/// Adds the ten columns to `table` (created by the consumer's own DDL).
pub(crate) fn add_columns(clickhouse: &ClickHouse, table: &Table<'_>) {
    clickhouse.query(&format!("ALTER TABLE {} {COLUMNS}", table.qualified()));
}

/// The `index`-th click with its ten extra fields, as a JSON body.
pub(crate) fn body(index: u64) -> Vec<u8> {
    let mut event = serde_json::to_value(events::click(index)).expect("a click serializes");
    let n = index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let pick = |choices: &[&'static str], salt: u64| {
        choices[((n >> salt) % choices.len() as u64) as usize]
    };
    let fields = json!({
        "country": pick(COUNTRIES, 3),
        "device": pick(DEVICES, 9),
        "campaign": format!("winter-sale-{}", n % 7),
        "user_id": n >> 20,
        "is_bot": n.is_multiple_of(17),
        "click_id": format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", n >> 32, (n >> 16) & 0xffff, n & 0xfff, (n >> 4) & 0xfff, index),
        "dwell_ms": if n.is_multiple_of(5) { Value::Null } else { json!(n % 60_000) },
        "score": (n % 1000) as f64 / 7.0,
        "tags": [pick(TAGS, 13), pick(TAGS, 21)],
        "first_seen": "2024-01-15T10:30:00Z",
    });
    let (Value::Object(object), Value::Object(extra)) = (&mut event, fields) else {
        unreachable!("both are objects");
    };
    object.extend(extra);
    serde_json::to_vec(&event).expect("JSON serializes")
}

/// Publishes events `range` with their extra fields, all confirms awaited together.
pub(crate) async fn publish(
    publisher: &ClickPublisher,
    range: std::ops::Range<u64>,
) -> click_consumer::Result<()> {
    let bodies: Vec<Vec<u8>> = range.map(body).collect();
    futures_util::future::try_join_all(bodies.iter().map(|b| publisher.publish_bytes(b))).await?;
    Ok(())
}

/// Fails unless every row has its extra columns filled (one that is never empty).
pub(crate) fn check_filled(
    clickhouse: &ClickHouse,
    table: &Table<'_>,
    rows: u64,
) -> anyhow::Result<()> {
    let out = clickhouse.query(&format!(
        "SELECT count() FROM {} WHERE campaign != '' AND length(tags) = 2",
        table.qualified()
    ));
    let filled: u64 = out.trim().parse()?;
    anyhow::ensure!(
        filled == rows,
        "{filled} of {rows} rows have their extra columns filled"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_clicks_with_ten_extra_fields() {
        for index in 0..500 {
            let body = body(index);
            click_consumer::ClickEvent::decode(&body).unwrap();
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value.as_object().unwrap().len(), 16);
        }
    }
}
