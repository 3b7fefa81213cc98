//! The click event: its wire form (JSON, as the URL shortener publishes it), the decoding
//! rules, and its ClickHouse row.

use std::{borrow::Cow, fmt};

use serde::{Deserialize, Deserializer, Serialize, de};

use crate::columns::{Layout, Shape};
use crate::field::{ColumnType, Value};
use crate::{rowbinary, timestamp};

/// One click, as the shortener publishes it: one JSON object per message.
///
/// `timestamp` is ISO 8601 (`2024-01-15T10:30:00Z`, `2024-01-15T12:30:00+02:00`, or without
/// an offset, read as UTC). The four descriptive fields may be empty.
///
/// ```
/// use click_consumer::ClickEvent;
///
/// let event = ClickEvent::new("abc123", "2024-01-15T10:30:00Z")
///     .with_user_agent("curl/8.5.0")
///     .with_original_url("https://example.com/");
/// let json = serde_json::to_string(&event)?;
/// assert_eq!(ClickEvent::decode(json.as_bytes())?, event);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClickEvent {
    /// The short code that was clicked. Required, non-empty.
    pub short_code: String,
    /// When the click happened, ISO 8601.
    pub timestamp: String,
    /// The client's `User-Agent`.
    pub user_agent: String,
    /// The client's IP address.
    pub ip_address: String,
    /// The `Referer` header.
    pub referrer: String,
    /// The URL the short code redirects to.
    pub original_url: String,
}

impl ClickEvent {
    /// A click on `short_code` at `timestamp` (ISO 8601), other fields empty.
    pub fn new(short_code: impl Into<String>, timestamp: impl Into<String>) -> Self {
        ClickEvent {
            short_code: short_code.into(),
            timestamp: timestamp.into(),
            ..ClickEvent::default()
        }
    }

    /// A click on `short_code` now, the timestamp in UTC with a `Z`.
    pub fn now(short_code: impl Into<String>) -> Self {
        Self::new(short_code, timestamp::now_rfc3339())
    }

    /// Sets `user_agent`.
    pub fn with_user_agent(mut self, value: impl Into<String>) -> Self {
        self.user_agent = value.into();
        self
    }

    /// Sets `ip_address`.
    pub fn with_ip_address(mut self, value: impl Into<String>) -> Self {
        self.ip_address = value.into();
        self
    }

    /// Sets `referrer`.
    pub fn with_referrer(mut self, value: impl Into<String>) -> Self {
        self.referrer = value.into();
        self
    }

    /// Sets `original_url`.
    pub fn with_original_url(mut self, value: impl Into<String>) -> Self {
        self.original_url = value.into();
        self
    }

    /// Decodes a message body by the consumer's rules, so a producer can check what it
    /// sends. Missing or `null` optional fields become `""`; unknown fields are ignored.
    ///
    /// # Errors
    /// [`InvalidMessage`] saying why the consumer would dead-letter this body.
    pub fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let row = Row::decode(body, usize::MAX)?;
        Ok(ClickEvent {
            short_code: row.short_code.into_owned(),
            timestamp: timestamp::format_rfc3339(row.timestamp),
            user_agent: row.user_agent.into_owned(),
            ip_address: row.ip_address.into_owned(),
            referrer: row.referrer.into_owned(),
            original_url: row.original_url.into_owned(),
        })
    }
}

/// Why a message body is not a valid click event. The consumer dead-letters such a message
/// with [`InvalidMessage::kind`] and the text of this error in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage {
    kind: InvalidKind,
    detail: String,
}

/// Categories of invalid messages; the `as_str` names are metric labels and header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidKind {
    /// The body is larger than `MAX_MESSAGE_BYTES`.
    TooLarge,
    /// The body is not UTF-8.
    NotUtf8,
    /// The body is not JSON (syntax error, empty, truncated, nested too deeply).
    NotJson,
    /// The JSON is not an object (an array, a string, a number...).
    NotAnObject,
    /// A field has the wrong type, is duplicated, or a required one is missing or empty.
    InvalidField,
    /// `timestamp` does not parse or is outside ClickHouse `DateTime`'s range.
    InvalidTimestamp,
    /// ClickHouse refused the row when it was inserted.
    RejectedByClickHouse,
    /// A valid message released back to a quorum queue so often (during a ClickHouse
    /// outage) that one more release would exceed the queue's `x-delivery-limit`: the
    /// broker would then dead-letter it without a reason. Replay it once ClickHouse is
    /// back.
    DeliveryLimit,
}

impl InvalidKind {
    /// The stable name, used as metric label and in the `x-error-kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::TooLarge => "too_large",
            InvalidKind::NotUtf8 => "not_utf8",
            InvalidKind::NotJson => "not_json",
            InvalidKind::NotAnObject => "not_an_object",
            InvalidKind::InvalidField => "invalid_field",
            InvalidKind::InvalidTimestamp => "invalid_timestamp",
            InvalidKind::RejectedByClickHouse => "rejected_by_clickhouse",
            InvalidKind::DeliveryLimit => "delivery_limit",
        }
    }

    /// Every kind, for pre-registering metric labels.
    pub const ALL: [InvalidKind; 8] = [
        InvalidKind::TooLarge,
        InvalidKind::NotUtf8,
        InvalidKind::NotJson,
        InvalidKind::NotAnObject,
        InvalidKind::InvalidField,
        InvalidKind::InvalidTimestamp,
        InvalidKind::RejectedByClickHouse,
        InvalidKind::DeliveryLimit,
    ];
}

impl InvalidMessage {
    pub(crate) fn new(kind: InvalidKind, detail: impl Into<String>) -> Self {
        InvalidMessage {
            kind,
            detail: detail.into(),
        }
    }

    /// The category.
    pub fn kind(&self) -> InvalidKind {
        self.kind
    }
}

impl fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for InvalidMessage {}

/// A decoded row, borrowing from the message body where it can.
#[derive(Debug)]
pub(crate) struct Row<'a> {
    pub(crate) short_code: Cow<'a, str>,
    pub(crate) timestamp: u32,
    pub(crate) user_agent: Cow<'a, str>,
    pub(crate) ip_address: Cow<'a, str>,
    pub(crate) referrer: Cow<'a, str>,
    pub(crate) original_url: Cow<'a, str>,
    /// The values of the layout's extra columns, by index (`None`: missing).
    pub(crate) extras: Vec<Option<Value<'a>>>,
}

/// The JSON object, fields borrowed where no unescaping is needed; `extras` holds the
/// fields named like the layout's extra columns (`Some(Value::Null)` for a `null`).
struct Wire<'a> {
    short_code: Option<Text<'a>>,
    timestamp: Option<Text<'a>>,
    user_agent: Option<Text<'a>>,
    ip_address: Option<Text<'a>>,
    referrer: Option<Text<'a>>,
    original_url: Option<Text<'a>>,
    extras: Vec<Option<Value<'a>>>,
}

/// Decodes a [`Wire`] in one pass over the object: contract fields by name, extra
/// fields by the layout, anything else skipped without allocating.
struct WireSeed<'l>(&'l Layout);

impl<'de> de::DeserializeSeed<'de> for WireSeed<'_> {
    type Value = Wire<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> de::Visitor<'de> for WireSeed<'_> {
    type Value = Wire<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a click event object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        /// A contract field: `None` unseen, `Some(None)` null.
        type Seen<'a> = Option<Option<Text<'a>>>;
        let mut contract: [Seen<'de>; 6] = Default::default();
        let mut extras: Vec<Option<Value<'de>>> = (0..self.0.extras.len()).map(|_| None).collect();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let key = &*key.0;
            if let Some(i) = COLUMNS.iter().position(|(name, _)| *name == key) {
                if contract[i].is_some() {
                    return Err(de::Error::duplicate_field(COLUMNS[i].0));
                }
                contract[i] = Some(map.next_value()?);
            } else if let Some(i) = self.0.extra(key) {
                if extras[i].is_some() {
                    return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                }
                extras[i] = Some(map.next_value()?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        let [
            short_code,
            timestamp,
            user_agent,
            ip_address,
            referrer,
            original_url,
        ] = contract.map(Option::flatten);
        Ok(Wire {
            short_code,
            timestamp,
            user_agent,
            ip_address,
            referrer,
            original_url,
            extras,
        })
    }
}

/// A JSON string, borrowed from the input unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

fn text(field: Option<Text<'_>>) -> Cow<'_, str> {
    field.map_or(Cow::Borrowed(""), |t| t.0)
}

impl<'a> Row<'a> {
    /// Applies every decoding rule to a message body (contract columns only).
    pub(crate) fn decode(body: &'a [u8], max_bytes: usize) -> Result<Self, InvalidMessage> {
        Self::decode_with(body, max_bytes, &Layout::default())
    }

    /// Applies every decoding rule to a message body, keeping the fields of `layout`'s
    /// extra columns (their values are checked when the row is encoded).
    pub(crate) fn decode_with(
        body: &'a [u8],
        max_bytes: usize,
        layout: &Layout,
    ) -> Result<Self, InvalidMessage> {
        use InvalidKind::*;
        if body.len() > max_bytes {
            return Err(InvalidMessage::new(
                TooLarge,
                format!(
                    "body of {} bytes exceeds MAX_MESSAGE_BYTES ({max_bytes})",
                    body.len()
                ),
            ));
        }
        let json = std::str::from_utf8(body)
            .map_err(|e| InvalidMessage::new(NotUtf8, format!("body is not UTF-8: {e}")))?;
        match json.trim_start().as_bytes().first() {
            Some(b'{') => {}
            None => return Err(InvalidMessage::new(NotJson, "body is empty")),
            Some(b'[') => {
                return Err(InvalidMessage::new(
                    NotAnObject,
                    "body is a JSON array, expected an object",
                ));
            }
            Some(_) => {
                // Tell "not JSON at all" from "JSON, but a scalar".
                return Err(match serde_json::from_str::<de::IgnoredAny>(json) {
                    Ok(_) => InvalidMessage::new(NotAnObject, "body is JSON but not an object"),
                    Err(e) => InvalidMessage::new(NotJson, format!("body is not JSON: {e}")),
                });
            }
        }
        if too_deep(json.as_bytes()) {
            return Err(InvalidMessage::new(
                NotJson,
                format!("body nests arrays or objects deeper than {MAX_NESTING} levels"),
            ));
        }
        let mut parser = serde_json::Deserializer::from_str(json);
        let wire = de::DeserializeSeed::deserialize(WireSeed(layout), &mut parser)
            .and_then(|wire| parser.end().map(|()| wire));
        let wire: Wire<'a> = wire.map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                InvalidMessage::new(InvalidField, format!("invalid click event: {e}"))
            }
            _ => InvalidMessage::new(NotJson, format!("body is not JSON: {e}")),
        })?;
        let short_code = text(wire.short_code);
        if short_code.is_empty() {
            return Err(InvalidMessage::new(
                InvalidField,
                "field `short_code` is missing, null or empty",
            ));
        }
        let Some(raw_timestamp) = wire.timestamp else {
            return Err(InvalidMessage::new(
                InvalidField,
                "field `timestamp` is missing or null",
            ));
        };
        let timestamp = timestamp::parse(&raw_timestamp.0).map_err(|e| {
            let shown: String = raw_timestamp.0.chars().take(64).collect();
            InvalidMessage::new(
                InvalidTimestamp,
                format!("field `timestamp` ({shown:?}): {e}"),
            )
        })?;
        Ok(Row {
            short_code,
            timestamp,
            user_agent: text(wire.user_agent),
            ip_address: text(wire.ip_address),
            referrer: text(wire.referrer),
            original_url: text(wire.original_url),
            extras: wire.extras,
        })
    }

    /// Appends the row in RowBinary, columns in [`COLUMNS`] order.
    #[cfg(test)]
    pub(crate) fn encode(&self, buf: &mut Vec<u8>) {
        self.encode_contract(buf, false);
    }

    /// The contract columns; with `flagged`, each value preceded by the 0 byte of
    /// RowBinaryWithDefaults ("a value follows").
    fn encode_contract(&self, buf: &mut Vec<u8>, flagged: bool) {
        let flag = |buf: &mut Vec<u8>| {
            if flagged {
                buf.push(0);
            }
        };
        flag(buf);
        rowbinary::put_string(buf, &self.short_code);
        flag(buf);
        rowbinary::put_datetime(buf, self.timestamp);
        for text in [
            &self.user_agent,
            &self.ip_address,
            &self.referrer,
            &self.original_url,
        ] {
            flag(buf);
            rowbinary::put_string(buf, text);
        }
    }

    /// Appends the row as `shape` lays it out: contract columns, then the extra columns
    /// the shape writes, each value checked against its column's type. On a value that
    /// does not fit, `buf` is left as it was.
    ///
    /// # Errors
    /// [`InvalidKind::InvalidField`] naming the field and the column's type.
    pub(crate) fn encode_with(
        &self,
        shape: &Shape,
        buf: &mut Vec<u8>,
    ) -> Result<(), InvalidMessage> {
        let layout = &*shape.layout;
        let start = buf.len();
        self.encode_contract(buf, layout.with_defaults);
        for ((column, value), written) in layout.extras.iter().zip(&self.extras).zip(&shape.written)
        {
            if !written {
                continue;
            }
            if layout.with_defaults {
                let absent = matches!(value, None | Some(Value::Null));
                if absent && !matches!(column.ty, ColumnType::Nullable(_)) {
                    buf.push(1); // the column's DEFAULT
                    continue;
                }
                buf.push(0);
            }
            if let Err(misfit) = column.ty.put(value.as_ref(), buf) {
                buf.truncate(start);
                return Err(InvalidMessage::new(
                    InvalidKind::InvalidField,
                    format!(
                        "field `{}` ({} column): {misfit}",
                        column.name, column.type_name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the row names (with a non-null value) an extra column `shape` does not
    /// write yet.
    pub(crate) fn needs_more_than(&self, shape: &Shape) -> bool {
        self.extras
            .iter()
            .zip(&shape.written)
            .any(|(value, written)| !written && !matches!(value, None | Some(Value::Null)))
    }

    /// Marks the extra columns this row names as written by `shape`.
    pub(crate) fn widen(&self, shape: &mut Shape) {
        for (value, written) in self.extras.iter().zip(&mut shape.written) {
            if !matches!(value, None | Some(Value::Null)) {
                *written = true;
            }
        }
    }
}

/// Deepest nesting of arrays and objects accepted anywhere in a body. A click event is
/// flat; this refuses pathological bodies before they are parsed.
const MAX_NESTING: usize = 32;

/// Whether `json` nests arrays or objects deeper than [`MAX_NESTING`]. A body with no
/// more opening brackets than that cannot, so the exact walk ([`nesting_depth`]) is only
/// taken by the rare body that has more: memchr finds the brackets with SIMD, the walk
/// takes a branch per byte (callgrind: the walk was a tenth of the consumer's own
/// instructions per click).
fn too_deep(json: &[u8]) -> bool {
    let openers = memchr::memchr2_iter(b'[', b'{', json).count();
    openers > MAX_NESTING && nesting_depth(json) > MAX_NESTING
}

/// The deepest nesting of `[`/`{` outside strings (a single pass over the bytes).
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The table's columns, in the order [`Row::encode`] writes them, with their types.
pub(crate) const COLUMNS: [(&str, &str); 6] = [
    ("short_code", "String"),
    ("timestamp", "DateTime"),
    ("user_agent", "String"),
    ("ip_address", "String"),
    ("referrer", "String"),
    ("original_url", "String"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<Row<'_>, InvalidMessage> {
        Row::decode(body.as_bytes(), 1024 * 1024)
    }

    fn kind_of(body: &[u8]) -> InvalidKind {
        match Row::decode(body, 1024) {
            Ok(row) => panic!(
                "{:?} must be invalid, decoded {row:?}",
                String::from_utf8_lossy(body)
            ),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn full_event() {
        let row = decode(
            r#"{"short_code":"abc123","timestamp":"2024-01-15T10:30:00Z","user_agent":"Mozilla/5.0",
               "ip_address":"203.0.113.7","referrer":"https://news.example/","original_url":"https://example.com/a?b=c"}"#,
        )
        .expect("valid");
        assert_eq!(row.short_code, "abc123");
        assert_eq!(row.timestamp, 1_705_314_600);
        assert_eq!(row.user_agent, "Mozilla/5.0");
        assert_eq!(row.ip_address, "203.0.113.7");
        assert_eq!(row.referrer, "https://news.example/");
        assert_eq!(row.original_url, "https://example.com/a?b=c");
        assert!(
            matches!(row.short_code, Cow::Borrowed(_)),
            "plain strings are not copied"
        );
    }

    #[test]
    fn optional_fields_missing_or_null_are_empty() {
        let row = decode(r#"{"short_code":"x","timestamp":"2024-01-15 10:30:00","referrer":null}"#)
            .expect("valid");
        assert_eq!(
            (
                &*row.user_agent,
                &*row.ip_address,
                &*row.referrer,
                &*row.original_url
            ),
            ("", "", "", "")
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_escapes_decoded() {
        let row = decode(
            r#"{"extra":{"deep":[1,2,{"x":null}]},"short_code":"a\"b\u00e9","timestamp":"2024-01-15T10:30:00.5+01:00","n":5}"#,
        )
        .expect("valid");
        assert_eq!(row.short_code, "a\"bé");
        assert_eq!(row.timestamp, 1_705_314_600 - 3600);
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        let a = decode(r#"{"short_code":"x","timestamp":"2024-01-15T12:30:00+02:00"}"#).unwrap();
        let b = decode(r#"{"short_code":"x","timestamp":"2024-01-15T10:30:00Z"}"#).unwrap();
        assert_eq!(a.timestamp, b.timestamp);
    }

    #[test]
    fn invalid_bodies_are_classified() {
        use InvalidKind::*;
        let cases: &[(&[u8], InvalidKind)] = &[
            (b"", NotJson),
            (b"   ", NotJson),
            (b"not json", NotJson),
            (b"{\"short_code\":", NotJson),
            (b"{\"short_code\":\"x\",}", NotJson),
            (b"\xff\xfe{}", NotUtf8),
            (b"{\"short_code\":\"\xc3\x28\"}", NotUtf8),
            (b"[\"abc\",\"2024-01-15T10:30:00Z\"]", NotAnObject),
            (b"\"abc\"", NotAnObject),
            (b"42", NotAnObject),
            (b"null", NotAnObject),
            (b"{}", InvalidField),
            (b"{\"timestamp\":\"2024-01-15T10:30:00Z\"}", InvalidField),
            (b"{\"short_code\":\"\",\"timestamp\":\"2024-01-15T10:30:00Z\"}", InvalidField),
            (b"{\"short_code\":null,\"timestamp\":\"2024-01-15T10:30:00Z\"}", InvalidField),
            (b"{\"short_code\":5,\"timestamp\":\"2024-01-15T10:30:00Z\"}", InvalidField),
            (b"{\"short_code\":\"x\",\"timestamp\":1705314600}", InvalidField),
            (b"{\"short_code\":\"x\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"user_agent\":[]}", InvalidField),
            (b"{\"short_code\":\"x\",\"short_code\":\"y\",\"timestamp\":\"2024-01-15T10:30:00Z\"}", InvalidField),
            (b"{\"short_code\":\"x\"}", InvalidField),
            (b"{\"short_code\":\"x\",\"timestamp\":null}", InvalidField),
            (b"{\"short_code\":\"x\",\"timestamp\":\"yesterday\"}", InvalidTimestamp),
            (b"{\"short_code\":\"x\",\"timestamp\":\"1969-12-31T23:59:59Z\"}", InvalidTimestamp),
            (b"{\"short_code\":\"x\",\"timestamp\":\"2200-01-01T00:00:00Z\"}", InvalidTimestamp),
        ];
        for (body, expected) in cases {
            assert_eq!(
                kind_of(body),
                *expected,
                "body {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let body = format!(
            "{{\"short_code\":\"x\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = Row::decode(body.as_bytes(), usize::MAX).expect_err("too deep");
        assert_eq!(err.kind(), InvalidKind::NotJson, "{err}");
    }

    #[test]
    fn nesting_depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(br#"{"a":"[[[{{{\"]]]","b":[{"c":1}]}"#), 3);
        let ok = format!(
            "{{\"short_code\":\"x\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"x\":{}{}}}",
            "[".repeat(MAX_NESTING - 1),
            "]".repeat(MAX_NESTING - 1)
        );
        Row::decode(ok.as_bytes(), usize::MAX).expect("nesting up to the limit is fine");
        let deeper = format!(
            "{{\"short_code\":\"x\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"x\":{}{}}}",
            "[".repeat(MAX_NESTING),
            "]".repeat(MAX_NESTING)
        );
        let err = Row::decode(deeper.as_bytes(), usize::MAX).expect_err("one level too deep");
        assert!(err.to_string().contains("deeper than 32"), "{err}");
        // Many brackets, shallow: the count alone does not refuse.
        let shallow = format!(
            "{{\"short_code\":\"x{}\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"x\":[{}]}}",
            "[{".repeat(100),
            "{},".repeat(100).trim_end_matches(',')
        );
        Row::decode(shallow.as_bytes(), usize::MAX).expect("many brackets, depth 2");
    }

    #[test]
    fn size_limit_applies_before_parsing() {
        let body = format!(
            "{{\"short_code\":\"{}\",\"timestamp\":\"2024-01-15T10:30:00Z\"}}",
            "x".repeat(2000)
        );
        let err = Row::decode(body.as_bytes(), 1024).expect_err("too large");
        assert_eq!(err.kind(), InvalidKind::TooLarge);
        assert!(err.to_string().contains("1024"), "{err}");
        Row::decode(body.as_bytes(), body.len()).expect("exactly at the limit is fine");
    }

    #[test]
    fn reasons_are_readable() {
        let err = decode(r#"{"short_code":5,"timestamp":"2024-01-15T10:30:00Z"}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid type: integer `5`, expected a string"),
            "{err}"
        );
        let err = decode(r#"{"short_code":"x","timestamp":"2024-02-30T00:00:00Z"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"field `timestamp` ("2024-02-30T00:00:00Z"): the date does not exist"#
        );
    }

    #[test]
    fn encodes_rowbinary_in_column_order() {
        let row =
            decode(r#"{"short_code":"ab","timestamp":"1970-01-01T00:00:01Z","original_url":"u"}"#)
                .unwrap();
        let mut buf = Vec::new();
        row.encode(&mut buf);
        assert_eq!(buf, [2, b'a', b'b', 1, 0, 0, 0, 0, 0, 0, 1, b'u']);
    }

    fn layout(with_defaults: bool) -> std::sync::Arc<Layout> {
        use crate::columns::Extra;
        let extra = |name: &str, ty: &str, has_default| Extra {
            name: name.to_owned(),
            type_name: ty.to_owned(),
            ty: ColumnType::parse(ty).unwrap(),
            has_default,
        };
        std::sync::Arc::new(Layout {
            extras: vec![
                extra("n", "UInt8", false),
                extra("tag", "Nullable(String)", false),
                extra("d", "UInt16", true),
            ],
            with_defaults,
        })
    }

    const CONTRACT_BYTES: [u8; 10] = [1, b'x', 1, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn extra_fields_are_encoded_after_the_contract_columns() {
        let layout = layout(false);
        let body =
            br#"{"short_code":"x","d":7,"timestamp":"1970-01-01T00:00:01Z","n":5,"other":[1]}"#;
        let row = Row::decode_with(body, 1 << 20, &layout).unwrap();
        let mut shape = Shape::new(layout);
        assert!(
            row.needs_more_than(&shape),
            "`d` has a DEFAULT and is named"
        );
        row.widen(&mut shape);
        let mut buf = Vec::new();
        row.encode_with(&shape, &mut buf).unwrap();
        assert_eq!(buf, [&CONTRACT_BYTES[..], &[5, 1, 7, 0]].concat());
    }

    #[test]
    fn row_binary_with_defaults_flags_every_value() {
        let layout = layout(true);
        let body = br#"{"short_code":"x","timestamp":"1970-01-01T00:00:01Z","tag":null}"#;
        let row = Row::decode_with(body, 1 << 20, &layout).unwrap();
        let mut shape = Shape::new(layout);
        shape.written[2] = true;
        let mut buf = Vec::new();
        row.encode_with(&shape, &mut buf).unwrap();
        // Each contract value after a 0: short_code, timestamp, then four empty strings.
        let contract = [0, 1, b'x', 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        // n missing: default (1); tag null: NULL (0 then the null flag 1); d missing: default.
        assert_eq!(buf, [&contract[..], &[1, 0, 1, 1]].concat());
    }

    #[test]
    fn misfits_and_duplicates_are_invalid_fields_and_leave_the_buffer_alone() {
        let layout = layout(false);
        let shape = Shape::new(layout.clone());
        let mut buf = vec![9];
        let body = br#"{"short_code":"x","timestamp":"1970-01-01T00:00:01Z","n":256}"#;
        let err = Row::decode_with(body, 1 << 20, &layout)
            .unwrap()
            .encode_with(&shape, &mut buf)
            .unwrap_err();
        assert_eq!(err.kind(), InvalidKind::InvalidField);
        assert_eq!(
            err.to_string(),
            "field `n` (UInt8 column): 256 is out of range"
        );
        assert_eq!(buf, [9]);
        let body = br#"{"short_code":"x","timestamp":"1970-01-01T00:00:01Z","n":1,"n":2}"#;
        let err = Row::decode_with(body, 1 << 20, &layout).unwrap_err();
        assert_eq!(err.kind(), InvalidKind::InvalidField);
        assert!(err.to_string().contains("duplicate field `n`"), "{err}");
        let body = br#"{"short_code":"x","timestamp":"1970-01-01T00:00:01Z","n":1,"n":2}"#;
        Row::decode(body, 1 << 20).expect("without the column, `n` is just ignored");
    }

    #[test]
    fn public_decode_round_trips() {
        let event = ClickEvent::new("abc", "2024-01-15T12:30:00+02:00").with_referrer("r");
        let json = serde_json::to_vec(&event).unwrap();
        let decoded = ClickEvent::decode(&json).unwrap();
        assert_eq!(
            decoded.timestamp, "2024-01-15T10:30:00Z",
            "normalised to UTC"
        );
        assert_eq!(decoded.referrer, "r");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_string(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any bytes at all: a row or a reason, never a panic; a row always encodes.
        #[test]
        fn any_body_is_a_row_or_a_reason(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            match Row::decode(&body, 1024) {
                Ok(row) => {
                    prop_assert!(!row.short_code.is_empty());
                    let mut buf = Vec::new();
                    row.encode(&mut buf);
                    prop_assert!(buf.len() >= 4 + 6);
                }
                Err(reason) => prop_assert!(!reason.to_string().is_empty()),
            }
        }

        /// JSON-looking noise around the real field names exercises the parser deeper
        /// than random bytes do.
        #[test]
        fn json_noise_is_a_row_or_a_reason(
            fields in proptest::collection::vec(
                (prop_oneof![
                    Just("short_code"), Just("timestamp"), Just("user_agent"),
                    Just("ip_address"), Just("referrer"), Just("original_url"), Just("x"),
                ], prop_oneof![
                    "\\PC{0,20}".prop_map(|s| json_string(&s)),
                    Just("null".to_owned()), Just("1".to_owned()), Just("[]".to_owned()),
                    Just("{}".to_owned()), Just("\"2024-01-15T10:30:00Z\"".to_owned()),
                ]),
                0..8,
            )
        ) {
            let body = format!(
                "{{{}}}",
                fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            );
            let _ = Row::decode(body.as_bytes(), 1 << 20);
        }

        /// Every valid event decodes to exactly what was sent, timestamps normalised.
        #[test]
        fn valid_events_round_trip(
            code in "\\PC{1,40}",
            seconds in 0u32..=u32::MAX,
            agent in "\\PC{0,80}",
            ip in "\\PC{0,40}",
        ) {
            let event = ClickEvent::new(code.clone(), timestamp::format_rfc3339(seconds))
                .with_user_agent(agent.clone())
                .with_ip_address(ip.clone());
            let body = serde_json::to_vec(&event).unwrap();
            let row = Row::decode(&body, usize::MAX).unwrap();
            prop_assert_eq!(&*row.short_code, code.as_str());
            prop_assert_eq!(row.timestamp, seconds);
            prop_assert_eq!(&*row.user_agent, agent.as_str());
            prop_assert_eq!(&*row.ip_address, ip.as_str());
        }
    }
}
