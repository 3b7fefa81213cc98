//! `schema/click_event.schema.json` is the contract for producers in other languages:
//! what the publisher sends validates, and the schema and the consumer agree on samples.

use click_consumer::{ClickEvent, Config};

use crate::common::*;

fn validator() -> jsonschema::Validator {
    let text = include_str!("../../../schema/click_event.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn schema_accepts(validator: &jsonschema::Validator, body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|value| validator.is_valid(&value))
}

#[tokio::test]
async fn what_the_publisher_sends_validates() {
    let validator = validator();
    let names = Names::new("schema");
    // No consumer: the published messages wait in the queue and are read back raw.
    let config: Config = config(&names);
    let publisher = publisher(&config).await;
    let events = [
        event(1),
        ClickEvent::now("now"),
        ClickEvent::new("üñí", "2024-01-15T12:30:00+02:00").with_referrer("https://r.example/"),
        ClickEvent::new("bare", "2024-01-15 10:30:00"),
    ];
    publisher.publish_all(&events).await.unwrap();
    let bodies = drain(&names.queue).await;
    assert_eq!(bodies.len(), events.len());
    for taken in bodies {
        let text = String::from_utf8_lossy(&taken.body);
        assert!(
            schema_accepts(&validator, &taken.body),
            "schema refuses the publisher's {text}"
        );
        ClickEvent::decode(&taken.body).unwrap_or_else(|e| panic!("consumer refuses {text}: {e}"));
    }
}

#[test]
fn the_schema_and_the_consumer_agree_on_samples() {
    let validator = validator();
    let samples: &[(&str, bool)] = &[
        (
            r#"{"short_code":"a","timestamp":"2024-01-15T10:30:00Z"}"#,
            true,
        ),
        (
            r#"{"short_code":"a","timestamp":"2024-01-15T10:30:00.5+02:00","user_agent":null}"#,
            true,
        ),
        (
            r#"{"short_code":"a","timestamp":"2024-01-15 10:30:00","extra":[1,{"b":2}]}"#,
            true,
        ),
        (
            r#"{"short_code":"a","timestamp":"2024-01-15T10:30:00+0530","ip_address":"::1"}"#,
            true,
        ),
        (
            r#"{"short_code":"","timestamp":"2024-01-15T10:30:00Z"}"#,
            false,
        ),
        (r#"{"timestamp":"2024-01-15T10:30:00Z"}"#, false),
        (r#"{"short_code":"a"}"#, false),
        (
            r#"{"short_code":1,"timestamp":"2024-01-15T10:30:00Z"}"#,
            false,
        ),
        (r#"{"short_code":"a","timestamp":1705314600}"#, false),
        (r#"{"short_code":"a","timestamp":"15/01/2024"}"#, false),
        (
            r#"{"short_code":"a","timestamp":"2024-01-15T10:30:00Z","referrer":5}"#,
            false,
        ),
        (r#"["a","2024-01-15T10:30:00Z"]"#, false),
        ("not json", false),
    ];
    for (body, valid) in samples {
        assert_eq!(
            schema_accepts(&validator, body.as_bytes()),
            *valid,
            "schema on {body}"
        );
        assert_eq!(
            ClickEvent::decode(body.as_bytes()).is_ok(),
            *valid,
            "consumer on {body}"
        );
    }
    // What a pattern cannot say, the schema says in words and the consumer enforces:
    // calendar dates and the DateTime range.
    for body in [
        r#"{"short_code":"a","timestamp":"2023-02-29T00:00:00Z"}"#,
        r#"{"short_code":"a","timestamp":"1969-12-31T23:59:59Z"}"#,
    ] {
        assert!(schema_accepts(&validator, body.as_bytes()), "{body}");
        assert!(ClickEvent::decode(body.as_bytes()).is_err(), "{body}");
    }
}
