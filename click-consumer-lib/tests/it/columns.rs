//! Extra columns on the real ClickHouse 18.16: every type that server has, filled from
//! same-named fields (valid, boundary, missing, null and misfit values), defaults left
//! to the server, columns added and dropped while the consumer runs.

use std::{
    io::{Read, Write},
    time::Duration,
};

use click_consumer::{Consumer, Error, InvalidKind, dead_letter_headers as dlh};

use crate::common::*;

/// Every extra column type ClickHouse 18.16 has (it lacks Bool, IPv4/IPv6, DateTime64
/// and Map), plus columns the consumer leaves to the server.
const EXTRA_COLUMNS: &str = "
    s String, fs FixedString(4), lc LowCardinality(String),
    u8 UInt8, u16 UInt16, u32 UInt32, u64 UInt64,
    i8 Int8, i16 Int16, i32 Int32, i64 Int64, f32 Float32, f64 Float64,
    flag UInt8, d Date, dt DateTime, dtz DateTime('Europe/Paris'), id UUID,
    e8 Enum8('a' = -1, 'b' = 1), e16 Enum16('x' = 1000, 'y' = -1000),
    n Nullable(Int32), ns Nullable(String),
    arr_s Array(String), arr_i Array(Int64), arr_f Array(Float64), arr_n Array(Nullable(UInt8)),
    dflt String DEFAULT 'server default', mat UInt64 MATERIALIZED 7,
    tup Tuple(UInt8, String) DEFAULT (1, 'a')";

/// What the test reads back, in this order.
const SELECTED: &str = "s, hex(fs), lc, u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, flag, \
    toUInt16(d), toUnixTimestamp(dt), toUnixTimestamp(dtz), id, e8, e16, n, ns, arr_s, arr_i, arr_f, arr_n, \
    dflt, mat, tup";

/// Runs `sql` with URL `settings` (the testkit's `query` takes none): 18.16 creates
/// LowCardinality columns only with `allow_experimental_low_cardinality_type=1`.
fn query_with_settings(settings: &str, sql: &str) -> String {
    let port = servers().clickhouse.http_port();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /?{settings} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
        sql.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{response}\nquery: {sql}"
    );
    response
}

async fn create_table(names: &Names, extra: &str) {
    query(format!("CREATE DATABASE {}", names.database)).await;
    let sql = format!(
        "CREATE TABLE {} (short_code String, timestamp DateTime, user_agent String, \
         ip_address String, referrer String, original_url String, {extra}) \
         ENGINE = MergeTree() ORDER BY (short_code, timestamp)",
        names.table()
    );
    tokio::task::spawn_blocking(move || {
        query_with_settings("allow_experimental_low_cardinality_type=1", &sql)
    })
    .await
    .unwrap();
}

async fn row(names: &Names, short_code: &str) -> String {
    query(format!(
        "SELECT {SELECTED} FROM {} WHERE short_code = '{short_code}' FORMAT TSV",
        names.table()
    ))
    .await
    .trim_end_matches('\n')
    .to_owned()
}

fn body(short_code: &str, fields: &str) -> Vec<u8> {
    let sep = if fields.is_empty() { "" } else { "," };
    format!(r#"{{"short_code":"{short_code}","timestamp":"2024-01-15T10:30:00Z"{sep}{fields}}}"#)
        .into_bytes()
}

#[tokio::test]
async fn every_type_of_clickhouse_18_16_is_filled_and_checked() {
    let names = Names::new("types");
    create_table(&names, EXTRA_COLUMNS).await;
    let config = config(&names);
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;

    // Alone in its batch: no message names `dflt`, so the server fills its DEFAULT.
    publisher.publish_bytes(&body("missing", "")).await.unwrap();
    wait_for_rows(&names, 1).await;
    assert_eq!(
        row(&names, "missing").await,
        "\t00000000\t\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\
         00000000-0000-0000-0000-000000000000\ta\ty\t\\N\t\\N\t[]\t[]\t[]\t[]\t\
         server default\t7\t(1,'a')",
        "missing fields: zero values, NULL for Nullable, the server's DEFAULT"
    );

    let max = r#""s":"naïve \"q\"","fs":"abcd","lc":"NO","u8":255,"u16":65535,"u32":4294967295,
        "u64":18446744073709551615,"i8":127,"i16":32767,"i32":2147483647,
        "i64":9223372036854775807,"f32":3.4028234663852886e38,"f64":1.7976931348623157e308,
        "flag":true,"d":"2149-06-06","dt":"2106-02-07T06:28:15Z","dtz":"2024-01-15T12:30:00+02:00",
        "id":"ffffffff-ffff-ffff-ffff-ffffffffffff","e8":"b","e16":"x","n":2147483647,"ns":"",
        "arr_s":["a","",  "\u00e9"],"arr_i":[9223372036854775807,-9223372036854775808],
        "arr_f":[0.5,-2],"arr_n":[null,255],"dflt":"given""#;
    let min = r#""s":"","fs":"","lc":"","u8":0,"u16":0,"u32":0,"u64":0,"i8":-128,"i16":-32768,
        "i32":-2147483648,"i64":-9223372036854775808,"f32":-1.5,"f64":-0.25,"flag":false,
        "d":"1970-01-01","dt":"1970-01-01T00:00:00Z","dtz":"1970-01-01 00:00:00",
        "id":"00112233-4455-6677-8899-aabbccddeeff","e8":"a","e16":"y","n":-2147483648,"ns":null,
        "arr_s":[],"arr_i":[],"arr_f":[],"arr_n":[],"dflt":"""#;
    let nulls = r#""s":null,"fs":null,"lc":null,"u8":null,"u64":null,"i8":null,"f64":null,
        "flag":null,"d":null,"dt":null,"id":null,"e8":null,"e16":null,"n":null,"ns":null,
        "arr_s":null,"arr_n":null,"dflt":"named","unknown":{"x":[1]}"#;
    // One misfit per message; each must be dead-lettered, naming the field and its type.
    let misfits: &[(&str, &str)] = &[
        (
            r#""u8":256"#,
            "field `u8` (UInt8 column): 256 is out of range",
        ),
        (
            r#""i8":-129"#,
            "field `i8` (Int8 column): -129 is out of range",
        ),
        (
            r#""u64":-1"#,
            "field `u64` (UInt64 column): -1 is out of range",
        ),
        (
            r#""i64":9223372036854775808"#,
            "field `i64` (Int64 column): 9223372036854775808 is out of range",
        ),
        (
            r#""u32":1.5"#,
            "field `u32` (UInt32 column): expected an integer, found a float",
        ),
        (
            r#""u16":"42""#,
            "field `u16` (UInt16 column): expected an integer, found a string",
        ),
        (
            r#""s":5"#,
            "field `s` (String column): expected a string, found an integer",
        ),
        (
            r#""lc":["x"]"#,
            "field `lc` (LowCardinality(String) column): expected a string, found an array",
        ),
        (
            r#""fs":"abcde""#,
            "field `fs` (FixedString(4) column): a string of 5 bytes does not fit 4 bytes",
        ),
        (
            r#""f32":1e39"#,
            "field `f32` (Float32 column): 1000000000000000000000000000000000000000 is out of Float32's range",
        ),
        (
            r#""flag":"true""#,
            "field `flag` (UInt8 column): expected an integer, found a string",
        ),
        (
            r#""d":"2024-02-30""#,
            "field `d` (Date column): the date does not exist",
        ),
        (
            r#""d":"2149-06-07""#,
            "field `d` (Date column): outside ClickHouse Date's range (1970-01-01 to 2149-06-06)",
        ),
        (
            r#""dt":"yesterday""#,
            "field `dt` (DateTime column): expected ISO 8601",
        ),
        (
            r#""id":"not-a-uuid""#,
            "field `id` (UUID column): \"not-a-uuid\" is not a UUID",
        ),
        (
            r#""e8":"c""#,
            "field `e8` (Enum8('a' = -1, 'b' = 1) column): \"c\" is not one of the enum's names",
        ),
        (
            r#""arr_i":[1,"x"]"#,
            "field `arr_i` (Array(Int64) column): expected an integer, found a string",
        ),
        (
            r#""arr_s":[null]"#,
            "field `arr_s` (Array(String) column): null inside the array",
        ),
        (
            r#""n":2147483648"#,
            "field `n` (Nullable(Int32) column): 2147483648 is out of range",
        ),
        (
            r#""dflt":7"#,
            "field `dflt` (String column): expected a string, found an integer",
        ),
        (r#""u8":1,"u8":2"#, "duplicate field `u8`"),
    ];
    for (i, (fields, _)) in misfits.iter().enumerate() {
        publisher
            .publish_bytes(&body(&format!("misfit{i}"), fields))
            .await
            .unwrap();
    }
    publisher.publish_bytes(&body("max", max)).await.unwrap();
    publisher.publish_bytes(&body("min", min)).await.unwrap();
    publisher
        .publish_bytes(&body("nulls", nulls))
        .await
        .unwrap();
    wait_for_rows(&names, 4).await;
    wait_until(
        "the misfits' dead letters",
        Duration::from_secs(20),
        || async { queue_counts(&names.dead_letter_queue()).await.0 == misfits.len() as u64 },
    )
    .await;
    let summary = running.stop().await.expect("clean stop");
    assert_eq!(summary.stored, 4, "{summary:?}");
    assert_eq!(summary.dead_lettered, misfits.len() as u64, "{summary:?}");

    assert_eq!(
        row(&names, "max").await,
        "naïve \"q\"\t61626364\tNO\t255\t65535\t4294967295\t18446744073709551615\t127\t32767\t\
         2147483647\t9223372036854775807\t3.4028235e38\t1.7976931348623157e308\t1\t65535\t\
         4294967295\t1705314600\tffffffff-ffff-ffff-ffff-ffffffffffff\tb\tx\t2147483647\t\t\
         ['a','','é']\t[9223372036854775807,-9223372036854775808]\t[0.5,-2]\t[NULL,255]\t\
         given\t7\t(1,'a')"
    );
    assert_eq!(
        row(&names, "min").await,
        "\t00000000\t\t0\t0\t0\t0\t-128\t-32768\t-2147483648\t-9223372036854775808\t-1.5\t-0.25\t\
         0\t0\t0\t0\t00112233-4455-6677-8899-aabbccddeeff\ta\ty\t-2147483648\t\\N\t\
         []\t[]\t[]\t[]\t\t7\t(1,'a')"
    );
    assert_eq!(
        row(&names, "nulls").await,
        "\t00000000\t\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\
         00000000-0000-0000-0000-000000000000\ta\ty\t\\N\t\\N\t[]\t[]\t[]\t[]\t\
         named\t7\t(1,'a')",
        "null: zero values, NULL for Nullable"
    );

    let dead = drain(&names.dead_letter_queue()).await;
    assert_eq!(dead.len(), misfits.len());
    for letter in &dead {
        let short_code =
            serde_json::from_slice::<serde_json::Value>(&letter.body).unwrap()["short_code"]
                .as_str()
                .unwrap()
                .to_owned();
        let i: usize = short_code.trim_start_matches("misfit").parse().unwrap();
        let reason = letter.header(dlh::REASON).unwrap();
        assert_eq!(
            letter.header(dlh::KIND).as_deref(),
            Some(InvalidKind::InvalidField.as_str()),
            "{reason}"
        );
        assert!(
            reason.contains(misfits[i].1),
            "misfit {:?}: reason {reason:?} should contain {:?}",
            misfits[i].0,
            misfits[i].1
        );
    }
}

#[tokio::test]
async fn columns_added_and_dropped_while_running_need_no_restart() {
    let _ = env_logger::builder().is_test(true).try_init();
    let names = Names::new("alter");
    let config = config(&names).with_batch_timeout(Duration::from_millis(1500));
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    publisher
        .publish_bytes(&body("before", r#""country":"NO","clicks":3"#))
        .await
        .unwrap();
    wait_for_rows(&names, 1).await;

    // Added while running: picked up by the periodic re-read, without a restart.
    query(format!(
        "ALTER TABLE {} ADD COLUMN country LowCardinality(String) DEFAULT 'unknown', ADD COLUMN clicks UInt8",
        names.table()
    ))
    .await;
    let table = names.table();
    let mut sent = 0;
    wait_until(
        "a row with the new column filled",
        Duration::from_secs(30),
        || {
            sent += 1;
            let body = body(&format!("after{sent}"), r#""country":"SE","clicks":200"#);
            let publisher = &publisher;
            let table = table.clone();
            async move {
                publisher.publish_bytes(&body).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
                query(format!(
                    "SELECT count() FROM {table} WHERE country = 'SE' AND clicks = 200"
                ))
                .await
                .trim()
                    != "0"
            }
        },
    )
    .await;
    assert_eq!(
        query(format!(
            "SELECT country, clicks FROM {} WHERE short_code = 'before'",
            names.table()
        ))
        .await,
        "unknown\t0\n",
        "the row stored before the column existed has its default"
    );

    // Dropped under a batch encoded with it: the INSERT is refused (no such column),
    // the layout is read again and the batch encoded again, nothing is lost.
    publisher
        .publish_bytes(&body("dropped", r#""country":"DK","clicks":1"#))
        .await
        .unwrap();
    query(format!("ALTER TABLE {} DROP COLUMN clicks", names.table())).await;
    wait_until(
        "the row whose column was dropped",
        Duration::from_secs(20),
        || async {
            query(format!(
                "SELECT country FROM {} WHERE short_code = 'dropped'",
                names.table()
            ))
            .await
                == "DK\n"
        },
    )
    .await;
    let summary = running.stop().await.expect("clean stop");
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert_eq!(summary.stored, row_count(&names).await, "{summary:?}");
}

#[tokio::test]
async fn a_column_the_consumer_cannot_fill_stops_start_up() {
    let names = Names::new("unfillable");
    create_table(
        &names,
        "pair Tuple(UInt8, String), later Tuple(UInt8, String) DEFAULT (1, 'x')",
    )
    .await;
    let error = Consumer::new(config(&names))
        .unwrap()
        .run(std::future::pending())
        .await
        .expect_err("`pair` cannot be filled");
    assert!(matches!(error, Error::TableShape { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("column `pair` has type Tuple(UInt8, String)") && text.contains("no DEFAULT"),
        "{text}"
    );
}
