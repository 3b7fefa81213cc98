//! Extra columns: the ClickHouse types the consumer can fill from a JSON field, the
//! field's value as decoded (borrowed from the body), and its RowBinary encoding.
//!
//! The rules are strict: a value is written only if it fits its column exactly. A wrong
//! JSON type, an integer out of range, a float for an integer column, a number given as
//! a string (`"42"`), a bad UUID or IP, an unknown enum name or a string longer than a
//! `FixedString` is refused with a [`Misfit`] saying why; nothing is truncated, wrapped
//! or rounded except floats into `Float32` (nearest) and DateTime64 fractions beyond the
//! column's precision (dropped, as for `DateTime`).

use std::{borrow::Cow, fmt, net::IpAddr};

use serde::{Deserialize, Deserializer, de};

use crate::{rowbinary, timestamp};

/// A column type the consumer can write. `LowCardinality(T)` is written as `T`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ColumnType {
    String,
    FixedString(usize),
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    Date,
    DateTime,
    DateTime64(u32),
    Uuid,
    Ipv4,
    Ipv6,
    /// Names and values, in definition order.
    Enum8(Vec<(String, i8)>),
    Enum16(Vec<(String, i16)>),
    Nullable(Box<ColumnType>),
    Array(Box<ColumnType>),
}

impl ColumnType {
    /// Parses a type as `system.columns` spells it; `None` for a type the consumer does
    /// not write.
    pub(crate) fn parse(text: &str) -> Option<ColumnType> {
        let text = text.trim();
        if let Some(inner) = wrapped(text, "LowCardinality(") {
            return ColumnType::parse(inner);
        }
        if let Some(inner) = wrapped(text, "Nullable(") {
            let inner = ColumnType::parse(inner)?;
            return match inner {
                ColumnType::Nullable(_) | ColumnType::Array(_) => None,
                other => Some(ColumnType::Nullable(Box::new(other))),
            };
        }
        if let Some(inner) = wrapped(text, "Array(") {
            return Some(ColumnType::Array(Box::new(ColumnType::parse(inner)?)));
        }
        if let Some(n) = wrapped(text, "FixedString(") {
            return n.trim().parse().ok().map(ColumnType::FixedString);
        }
        if let Some(args) = wrapped(text, "DateTime64(") {
            // DateTime64(3) or DateTime64(3, 'UTC'): the time zone does not change the
            // stored value.
            let precision = args.split(',').next()?.trim().parse().ok()?;
            return (precision <= 9).then_some(ColumnType::DateTime64(precision));
        }
        if text.starts_with("DateTime('") && text.ends_with("')") {
            return Some(ColumnType::DateTime);
        }
        if let Some(body) = wrapped(text, "Enum8(") {
            let values = enum_values(body)?
                .into_iter()
                .map(|(name, value)| Some((name, i8::try_from(value).ok()?)))
                .collect::<Option<_>>()?;
            return Some(ColumnType::Enum8(values));
        }
        if let Some(body) = wrapped(text, "Enum16(") {
            let values = enum_values(body)?
                .into_iter()
                .map(|(name, value)| Some((name, i16::try_from(value).ok()?)))
                .collect::<Option<_>>()?;
            return Some(ColumnType::Enum16(values));
        }
        Some(match text {
            "String" => ColumnType::String,
            "UInt8" => ColumnType::UInt8,
            "UInt16" => ColumnType::UInt16,
            "UInt32" => ColumnType::UInt32,
            "UInt64" => ColumnType::UInt64,
            "Int8" => ColumnType::Int8,
            "Int16" => ColumnType::Int16,
            "Int32" => ColumnType::Int32,
            "Int64" => ColumnType::Int64,
            "Float32" => ColumnType::Float32,
            "Float64" => ColumnType::Float64,
            "Bool" => ColumnType::Bool,
            "Date" => ColumnType::Date,
            "DateTime" => ColumnType::DateTime,
            "UUID" => ColumnType::Uuid,
            "IPv4" => ColumnType::Ipv4,
            "IPv6" => ColumnType::Ipv6,
            _ => return None,
        })
    }

    /// Writes `value` (`None`: the field is missing) in RowBinary. A missing or `null`
    /// value is `NULL` in a `Nullable` column and the type's zero value elsewhere.
    pub(crate) fn put(&self, value: Option<&Value<'_>>, buf: &mut Vec<u8>) -> Result<(), Misfit> {
        match (self, value) {
            (ColumnType::Nullable(_), None | Some(Value::Null)) => {
                buf.push(1);
                Ok(())
            }
            (ColumnType::Nullable(inner), Some(value)) => {
                buf.push(0);
                inner.put(Some(value), buf)
            }
            (_, None | Some(Value::Null)) => {
                self.put_zero(buf);
                Ok(())
            }
            (_, Some(value)) => self.put_value(value, buf),
        }
    }

    /// The value ClickHouse itself uses for a missing value of this type.
    pub(crate) fn put_zero(&self, buf: &mut Vec<u8>) {
        let width = match self {
            ColumnType::String | ColumnType::Array(_) => 1, // length 0
            ColumnType::FixedString(n) => *n,
            ColumnType::UInt8 | ColumnType::Int8 | ColumnType::Bool => 1,
            ColumnType::UInt16 | ColumnType::Int16 | ColumnType::Date => 2,
            ColumnType::UInt32
            | ColumnType::Int32
            | ColumnType::Float32
            | ColumnType::DateTime
            | ColumnType::Ipv4 => 4,
            ColumnType::UInt64
            | ColumnType::Int64
            | ColumnType::Float64
            | ColumnType::DateTime64(_) => 8,
            ColumnType::Uuid | ColumnType::Ipv6 => 16,
            ColumnType::Nullable(_) => {
                buf.push(1);
                return;
            }
            // ClickHouse's default for an enum is its smallest value.
            ColumnType::Enum8(values) => {
                let min = values.iter().map(|(_, v)| *v).min().unwrap_or(0);
                buf.extend_from_slice(&min.to_le_bytes());
                return;
            }
            ColumnType::Enum16(values) => {
                let min = values.iter().map(|(_, v)| *v).min().unwrap_or(0);
                buf.extend_from_slice(&min.to_le_bytes());
                return;
            }
        };
        buf.resize(buf.len() + width, 0);
    }

    fn put_value(&self, value: &Value<'_>, buf: &mut Vec<u8>) -> Result<(), Misfit> {
        match self {
            ColumnType::String => rowbinary::put_string(buf, value.str()?),
            ColumnType::FixedString(n) => {
                let s = value.str()?;
                if s.len() > *n {
                    return Err(Misfit::new(format!(
                        "a string of {} bytes does not fit {n} bytes",
                        s.len()
                    )));
                }
                buf.extend_from_slice(s.as_bytes());
                buf.resize(buf.len() + (n - s.len()), 0);
            }
            ColumnType::UInt8 => match value {
                // Booleans are UInt8 on servers without the Bool type.
                Value::Bool(b) => buf.push(u8::from(*b)),
                _ => buf.push(int(value)?),
            },
            ColumnType::UInt16 => buf.extend_from_slice(&int::<u16>(value)?.to_le_bytes()),
            ColumnType::UInt32 => buf.extend_from_slice(&int::<u32>(value)?.to_le_bytes()),
            ColumnType::UInt64 => buf.extend_from_slice(&int::<u64>(value)?.to_le_bytes()),
            ColumnType::Int8 => buf.extend_from_slice(&int::<i8>(value)?.to_le_bytes()),
            ColumnType::Int16 => buf.extend_from_slice(&int::<i16>(value)?.to_le_bytes()),
            ColumnType::Int32 => buf.extend_from_slice(&int::<i32>(value)?.to_le_bytes()),
            ColumnType::Int64 => buf.extend_from_slice(&int::<i64>(value)?.to_le_bytes()),
            ColumnType::Float32 => {
                let f = float(value)?;
                if f.is_finite() && f.abs() > f64::from(f32::MAX) {
                    return Err(Misfit::new(format!("{f} is out of Float32's range")));
                }
                buf.extend_from_slice(&(f as f32).to_le_bytes());
            }
            ColumnType::Float64 => buf.extend_from_slice(&float(value)?.to_le_bytes()),
            ColumnType::Bool => match value {
                Value::Bool(b) => buf.push(u8::from(*b)),
                other => return Err(other.wrong_type("true or false")),
            },
            ColumnType::Date => {
                let days = timestamp::parse_date(value.str()?).map_err(Misfit::from)?;
                buf.extend_from_slice(&days.to_le_bytes());
            }
            ColumnType::DateTime => {
                let seconds = timestamp::parse(value.str()?).map_err(Misfit::from)?;
                rowbinary::put_datetime(buf, seconds);
            }
            ColumnType::DateTime64(precision) => {
                let ticks =
                    timestamp::parse_ticks(value.str()?, *precision).map_err(Misfit::from)?;
                buf.extend_from_slice(&ticks.to_le_bytes());
            }
            ColumnType::Uuid => put_uuid(buf, value.str()?)?,
            ColumnType::Ipv4 => {
                let ip: std::net::Ipv4Addr = value.str()?.parse().map_err(|_| {
                    Misfit::new(format!("{} is not an IPv4 address", value.shown()))
                })?;
                buf.extend_from_slice(&u32::from(ip).to_le_bytes());
            }
            ColumnType::Ipv6 => {
                let ip: IpAddr = value
                    .str()?
                    .parse()
                    .map_err(|_| Misfit::new(format!("{} is not an IP address", value.shown())))?;
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                buf.extend_from_slice(&v6.octets());
            }
            ColumnType::Enum8(values) => {
                let v = enum_value(values, value)?;
                buf.extend_from_slice(&v.to_le_bytes());
            }
            ColumnType::Enum16(values) => {
                let v = enum_value(values, value)?;
                buf.extend_from_slice(&v.to_le_bytes());
            }
            ColumnType::Nullable(inner) => {
                buf.push(0);
                inner.put_value(value, buf)?;
            }
            ColumnType::Array(inner) => {
                let Value::Array(items) = value else {
                    return Err(value.wrong_type("an array"));
                };
                put_varint(buf, items.len() as u64);
                for item in items {
                    match (&**inner, item) {
                        // `null` inside an array of a non-Nullable type is refused:
                        // the zero value would invent data.
                        (ColumnType::Nullable(_), _) => inner.put(Some(item), buf)?,
                        (_, Value::Null) => return Err(Misfit::new("null inside the array")),
                        _ => inner.put_value(item, buf)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// `inner` of `prefix...)`.
fn wrapped<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    text.strip_prefix(prefix)?.strip_suffix(')')
}

/// `'a' = 1, 'b\'c' = -2` into names and values.
fn enum_values(body: &str) -> Option<Vec<(String, i64)>> {
    let mut values = Vec::new();
    let mut rest = body.trim_start();
    while !rest.is_empty() {
        let mut chars = rest.strip_prefix('\'')?.char_indices();
        let mut name = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => name.push(chars.next()?.1),
                (i, '\'') => break i,
                (_, c) => name.push(c),
            }
        };
        rest = rest[1 + end + 1..]
            .trim_start()
            .strip_prefix('=')?
            .trim_start();
        let digits = rest
            .find(|c: char| c != '-' && !c.is_ascii_digit())
            .unwrap_or(rest.len());
        values.push((name, rest[..digits].parse().ok()?));
        rest = rest[digits..].trim_start();
        rest = rest.strip_prefix(',').map_or(rest, str::trim_start);
    }
    (!values.is_empty()).then_some(values)
}

fn enum_value<T: Copy>(values: &[(String, T)], value: &Value<'_>) -> Result<T, Misfit> {
    let name = value.str()?;
    values
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| Misfit::new(format!("{} is not one of the enum's names", value.shown())))
}

fn int<T: TryFrom<i64> + TryFrom<u64>>(value: &Value<'_>) -> Result<T, Misfit> {
    let fits = match value {
        Value::Int(i) => T::try_from(*i).ok(),
        Value::UInt(u) => T::try_from(*u).ok(),
        other => return Err(other.wrong_type("an integer")),
    };
    fits.ok_or_else(|| Misfit::new(format!("{} is out of range", value.shown())))
}

fn float(value: &Value<'_>) -> Result<f64, Misfit> {
    match value {
        Value::Float(f) => Ok(*f),
        Value::Int(i) => Ok(*i as f64),
        Value::UInt(u) => Ok(*u as f64),
        other => Err(other.wrong_type("a number")),
    }
}

/// A UUID is written as two little-endian `u64`s: the high half first.
fn put_uuid(buf: &mut Vec<u8>, text: &str) -> Result<(), Misfit> {
    let bad = || Misfit::new(format!("{:?} is not a UUID", shorten(text)));
    let b = text.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return Err(bad());
    }
    let mut value: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        if [8, 13, 18, 23].contains(&i) {
            continue;
        }
        let digit = (c as char).to_digit(16).ok_or_else(bad)?;
        value = value << 4 | u128::from(digit);
    }
    buf.extend_from_slice(&((value >> 64) as u64).to_le_bytes());
    buf.extend_from_slice(&(value as u64).to_le_bytes());
    Ok(())
}

fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf.push(byte);
            return;
        }
        buf.push(byte | 0x80);
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Why a value does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Misfit(String);

impl Misfit {
    fn new(reason: impl Into<String>) -> Self {
        Misfit(reason.into())
    }
}

impl From<timestamp::InvalidTimestamp> for Misfit {
    fn from(e: timestamp::InvalidTimestamp) -> Self {
        Misfit(e.to_string())
    }
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A JSON value of an extra field, strings borrowed from the body where possible.
/// Objects are not kept (no column type takes one).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object,
}

impl Value<'_> {
    fn str(&self) -> Result<&str, Misfit> {
        match self {
            Value::Str(s) => Ok(s),
            other => Err(other.wrong_type("a string")),
        }
    }

    fn wrong_type(&self, expected: &str) -> Misfit {
        let found = match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object => "an object",
        };
        Misfit::new(format!("expected {expected}, found {found}"))
    }

    /// The value for a reason, shortened.
    fn shown(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{:?}", shorten(s)),
            Value::Bool(b) => b.to_string(),
            Value::Null => "null".to_owned(),
            Value::Array(_) => "an array".to_owned(),
            Value::Object => "an object".to_owned(),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Value<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Value<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Value::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Value::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Value::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Value::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Value::Object)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(text: &str) -> ColumnType {
        ColumnType::parse(text).unwrap_or_else(|| panic!("{text} parses"))
    }

    fn put(text: &str, json: &str) -> Result<Vec<u8>, Misfit> {
        let value: Value<'_> = serde_json::from_str(json).unwrap();
        let mut buf = Vec::new();
        ty(text).put(Some(&value), &mut buf)?;
        Ok(buf)
    }

    fn misfit(text: &str, json: &str) -> String {
        match put(text, json) {
            Ok(bytes) => panic!("{json} into {text} must be refused, wrote {bytes:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_types_as_system_columns_spells_them() {
        assert_eq!(ty("LowCardinality(String)"), ColumnType::String);
        assert_eq!(
            ty("Nullable(Int32)"),
            ColumnType::Nullable(Box::new(ColumnType::Int32))
        );
        assert_eq!(ty("FixedString(4)"), ColumnType::FixedString(4));
        assert_eq!(ty("DateTime('Europe/Paris')"), ColumnType::DateTime);
        assert_eq!(ty("DateTime64(3, 'UTC')"), ColumnType::DateTime64(3));
        assert_eq!(
            ty(r"Enum8('y\'z' = -2, 'x' = 1)"),
            ColumnType::Enum8(vec![("y'z".to_owned(), -2), ("x".to_owned(), 1)])
        );
        assert_eq!(
            ty("Array(Nullable(UInt8))"),
            ColumnType::Array(Box::new(ColumnType::Nullable(Box::new(ColumnType::UInt8))))
        );
        assert_eq!(
            ty("LowCardinality(Nullable(String))"),
            ColumnType::Nullable(Box::new(ColumnType::String))
        );
        for unsupported in [
            "Tuple(UInt8, String)",
            "Map(String, String)",
            "Decimal(9, 2)",
            "Nested(a UInt8)",
            "AggregateFunction(uniq, String)",
            "Enum8('a' = 300)",
            "DateTime64(12)",
        ] {
            assert_eq!(ColumnType::parse(unsupported), None, "{unsupported}");
        }
    }

    #[test]
    fn integers_fit_exactly_or_are_refused() {
        assert_eq!(put("UInt8", "255").unwrap(), [255]);
        assert_eq!(put("Int8", "-128").unwrap(), [0x80]);
        assert_eq!(put("Int16", "-2").unwrap(), [0xfe, 0xff]);
        assert_eq!(put("UInt64", "18446744073709551615").unwrap(), [0xff; 8]);
        assert_eq!(
            put("Int64", "-9223372036854775808").unwrap(),
            i64::MIN.to_le_bytes()
        );
        assert_eq!(misfit("UInt8", "256"), "256 is out of range");
        assert_eq!(misfit("UInt32", "-1"), "-1 is out of range");
        assert_eq!(
            misfit("Int64", "9223372036854775808"),
            "9223372036854775808 is out of range"
        );
        assert_eq!(misfit("Int32", "1.5"), "expected an integer, found a float");
        assert_eq!(
            misfit("Int32", "\"42\""),
            "expected an integer, found a string"
        );
        assert_eq!(put("UInt8", "true").unwrap(), [1], "a boolean into UInt8");
        assert_eq!(
            misfit("UInt16", "true"),
            "expected an integer, found a boolean"
        );
    }

    #[test]
    fn floats() {
        assert_eq!(put("Float64", "1.5").unwrap(), 1.5f64.to_le_bytes());
        assert_eq!(put("Float64", "-3").unwrap(), (-3f64).to_le_bytes());
        assert_eq!(put("Float32", "0.25").unwrap(), 0.25f32.to_le_bytes());
        assert_eq!(
            misfit("Float32", "1e39"),
            "1000000000000000000000000000000000000000 is out of Float32's range"
        );
        assert_eq!(
            misfit("Float64", "\"1.5\""),
            "expected a number, found a string"
        );
    }

    #[test]
    fn strings() {
        assert_eq!(put("String", "\"ab\"").unwrap(), [2, b'a', b'b']);
        assert_eq!(put("FixedString(3)", "\"ab\"").unwrap(), [b'a', b'b', 0]);
        assert_eq!(put("FixedString(2)", "\"ab\"").unwrap(), [b'a', b'b']);
        assert_eq!(
            misfit("FixedString(2)", "\"abc\""),
            "a string of 3 bytes does not fit 2 bytes"
        );
        assert_eq!(
            misfit("FixedString(2)", "\"é€\""),
            "a string of 5 bytes does not fit 2 bytes"
        );
        assert_eq!(misfit("String", "5"), "expected a string, found an integer");
        assert_eq!(misfit("String", "{}"), "expected a string, found an object");
    }

    #[test]
    fn booleans_and_enums() {
        assert_eq!(put("Bool", "true").unwrap(), [1]);
        assert_eq!(put("Bool", "false").unwrap(), [0]);
        assert_eq!(
            misfit("Bool", "1"),
            "expected true or false, found an integer"
        );
        let e = "Enum8('a' = -1, 'b' = 5)";
        assert_eq!(put(e, "\"b\"").unwrap(), [5]);
        assert_eq!(put(e, "\"a\"").unwrap(), [0xff]);
        assert_eq!(misfit(e, "\"c\""), "\"c\" is not one of the enum's names");
        assert_eq!(misfit(e, "5"), "expected a string, found an integer");
        assert_eq!(
            put("Enum16('x' = 1000)", "\"x\"").unwrap(),
            1000i16.to_le_bytes()
        );
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(put("Date", "\"1970-01-02\"").unwrap(), [1, 0]);
        assert_eq!(put("Date", "\"2149-06-06\"").unwrap(), [0xff, 0xff]);
        assert!(misfit("Date", "\"2149-06-07\"").contains("range"));
        assert!(misfit("Date", "\"2024-02-30\"").contains("does not exist"));
        assert_eq!(
            put("DateTime", "\"1970-01-01T00:00:01Z\"").unwrap(),
            [1, 0, 0, 0]
        );
        assert_eq!(
            put("DateTime64(3)", "\"1970-01-01T00:00:01.2345Z\"").unwrap(),
            1234i64.to_le_bytes()
        );
        assert_eq!(
            put("DateTime64(6, 'UTC')", "\"1970-01-01T00:00:02.5+00:00\"").unwrap(),
            2_500_000i64.to_le_bytes()
        );
        assert_eq!(
            put("DateTime64(0)", "\"1970-01-01T00:00:02\"").unwrap(),
            2i64.to_le_bytes()
        );
        assert!(misfit("DateTime", "\"yesterday\"").contains("ISO 8601"));
    }

    #[test]
    fn uuids_and_ips() {
        assert_eq!(
            put("UUID", "\"00112233-4455-6677-8899-aabbccddeeff\"").unwrap(),
            [
                0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa,
                0x99, 0x88
            ]
        );
        assert!(misfit("UUID", "\"00112233-4455-6677-8899-aabbccddeefg\"").contains("not a UUID"));
        assert!(misfit("UUID", "\"0011223344556677-8899-aabbccddeeff\"").contains("not a UUID"));
        assert_eq!(put("IPv4", "\"1.2.3.4\"").unwrap(), [4, 3, 2, 1]);
        assert!(misfit("IPv4", "\"1.2.3.256\"").contains("not an IPv4"));
        assert!(misfit("IPv4", "\"::1\"").contains("not an IPv4"));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(put("IPv6", "\"::1\"").unwrap(), v6);
        let mapped = put("IPv6", "\"1.2.3.4\"").unwrap();
        assert_eq!(&mapped[10..], [0xff, 0xff, 1, 2, 3, 4]);
        assert!(misfit("IPv6", "\"::g\"").contains("not an IP"));
    }

    #[test]
    fn nullable_arrays_and_missing_values() {
        let mut buf = Vec::new();
        ty("Nullable(UInt8)").put(None, &mut buf).unwrap();
        ty("Nullable(UInt8)")
            .put(Some(&Value::Null), &mut buf)
            .unwrap();
        ty("Nullable(UInt8)")
            .put(Some(&Value::UInt(7)), &mut buf)
            .unwrap();
        assert_eq!(buf, [1, 1, 0, 7]);
        assert_eq!(
            put("Array(String)", r#"["a",""]"#).unwrap(),
            [2, 1, b'a', 0]
        );
        assert_eq!(put("Array(UInt16)", "[1,256]").unwrap(), [2, 1, 0, 0, 1]);
        assert_eq!(
            put("Array(Nullable(UInt8))", "[null,1]").unwrap(),
            [2, 1, 0, 1]
        );
        assert_eq!(misfit("Array(UInt8)", "[1,null]"), "null inside the array");
        assert_eq!(misfit("Array(UInt8)", "[1,256]"), "256 is out of range");
        assert_eq!(
            misfit("Array(UInt8)", "1"),
            "expected an array, found an integer"
        );
        for (text, zero) in [
            ("String", vec![0u8]),
            ("FixedString(3)", vec![0, 0, 0]),
            ("UInt64", vec![0; 8]),
            ("UUID", vec![0; 16]),
            ("Array(String)", vec![0]),
            ("Enum8('a' = 3, 'b' = -4)", vec![0xfc]),
            ("Date", vec![0, 0]),
        ] {
            let mut buf = Vec::new();
            ty(text).put(None, &mut buf).unwrap();
            assert_eq!(buf, zero, "zero of {text}");
            buf.clear();
            ty(text).put(Some(&Value::Null), &mut buf).unwrap();
            assert_eq!(buf, zero, "null into {text}");
        }
    }
}
