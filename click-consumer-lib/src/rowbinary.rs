//! Encoding of rows in ClickHouse's RowBinary format: a `String` is its length as an
//! unsigned LEB128 varint followed by its bytes, a `DateTime` is a little-endian `u32`.
//! Writing rows ourselves lets a batch be one contiguous buffer that is sent (and, on a
//! retry, re-sent) without any per-row work.

/// Appends a `String` column value.
pub(crate) fn put_string(buf: &mut Vec<u8>, s: &str) {
    let mut len = s.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            buf.push(byte);
            break;
        }
        buf.push(byte | 0x80);
    }
    buf.extend_from_slice(s.as_bytes());
}

/// Appends a `DateTime` column value.
pub(crate) fn put_datetime(buf: &mut Vec<u8>, seconds: u32) {
    buf.extend_from_slice(&seconds.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths() {
        let mut buf = Vec::new();
        put_string(&mut buf, "");
        assert_eq!(buf, [0]);

        buf.clear();
        put_string(&mut buf, "abc");
        assert_eq!(buf, [3, b'a', b'b', b'c']);

        for (len, prefix) in [
            (127usize, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            buf.clear();
            put_string(&mut buf, &"x".repeat(len));
            assert_eq!(&buf[..prefix.len()], prefix.as_slice(), "length {len}");
            assert_eq!(buf.len(), prefix.len() + len);
        }
    }

    #[test]
    fn datetime_is_little_endian() {
        let mut buf = Vec::new();
        put_datetime(&mut buf, 0x0102_0304);
        assert_eq!(buf, [4, 3, 2, 1]);
    }
}
