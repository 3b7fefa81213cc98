//! Values that must never reach a log line: passwords, and URLs that carry them.

use std::{borrow::Cow, fmt, ops::Range};

/// A password or other secret. `Debug` and `Display` print `***`; the value is only
/// reachable through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty (an empty password is not hidden in logs).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// Returns `url` with the password of its `user:password@` part replaced by `***`.
///
/// Works on any `scheme://user:pass@host/...` string, also on ones that do not parse as a
/// URL, so that an error about a malformed URL cannot leak the password either: the
/// userinfo ends at the *last* `@` after `scheme://`, so a password holding an unencoded
/// `#`, `/`, `?`, `@` or `:` is hidden whole (see [`url_password`]).
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some(span) => format!("{}***{}", &url[..span.start], &url[span.end..]),
        None => url.to_owned(),
    }
}

/// The password inside `url`'s `user:password@` part, as written (still percent-encoded
/// if it was), or `None` when the URL carries none. Same reading as [`redact_url`].
pub fn url_password(url: &str) -> Option<&str> {
    password_span(url).map(|span| &url[span])
}

/// `url` redacted for an error message, or `None` when the value must not be shown at
/// all: it has no `scheme://` (so nothing tells where a password would start), or some
/// form of its password would still appear in it.
pub(crate) fn shown_url(url: &str) -> Option<String> {
    if !url.contains("://") {
        return None;
    }
    let shown = redact_url(url);
    let scrubber = Scrubber::new().with_url(url);
    (scrubber.scrub(&shown) == shown).then_some(shown)
}

/// Where the password of `url` lies, as written, if it has one.
///
/// The userinfo of `scheme://userinfo@host/...` ends at the *last* `@` of the part after
/// `scheme://`, and everything after its first `:` is the password, whatever characters it
/// holds (`#`, `/`, `?`, `@`, `:`, spaces...). Without an `@`, a `scheme://name:value`
/// whose `value` is not a port number is taken as a password that lost its `@` (hiding a
/// mistyped host is better than showing a password). Without `scheme://`, only
/// `name:value@...` counts.
fn password_span(url: &str) -> Option<Range<usize>> {
    let (start, has_scheme) = match url.find("://") {
        Some(i) => (i + 3, true),
        None => (0, false),
    };
    let rest = &url[start..];
    if let Some(at) = rest.rfind('@') {
        let colon = rest[..at].find(':')?;
        return Some(start + colon + 1..start + at);
    }
    if !has_scheme {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    // An IPv6 literal's colons are not separators.
    let host_end = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        0
    };
    let colon = host_end + authority[host_end..].find(':')?;
    if authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(start + colon + 1..url.len())
}

/// Removes known secret values from text before it is written anywhere: the last line of
/// defence for messages that quote a secret some other way (a parser's error, a client
/// library's log line).
///
/// Each secret is hidden as written, percent-decoded and percent-encoded, since libraries
/// decode URL passwords and some print them re-encoded.
#[derive(Clone, Default)]
pub struct Scrubber {
    needles: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("secrets", &self.needles.len())
            .finish()
    }
}

impl Scrubber {
    /// A scrubber that hides nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also hides `secret` (an empty one is ignored).
    pub fn with_secret(mut self, secret: &str) -> Self {
        for form in [
            secret.to_owned(),
            percent_decode(secret),
            percent_encode(secret),
        ] {
            if !form.is_empty() && !self.needles.contains(&form) {
                self.needles.push(form);
            }
        }
        // Longest first, so that a secret containing another is hidden whole.
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        self
    }

    /// Also hides the password inside `url`, if it has one (see [`url_password`]).
    pub fn with_url(self, url: &str) -> Self {
        match url_password(url) {
            Some(password) => self.with_secret(password),
            None => self,
        }
    }

    /// Whether there is nothing to hide.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every occurrence of every secret replaced by `***`.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), "***"));
            }
        }
        out
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_hidden_in_debug_and_display() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "\"***\"");
        assert_eq!(secret.to_string(), "***");
        assert!(!format!("{secret:#?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_password() {
        let cases = [
            (
                "amqp://guest:guest@localhost:5672/",
                "amqp://guest:***@localhost:5672/",
            ),
            (
                "amqps://user:p%40ss@broker.example:5671/%2f?heartbeat=10",
                "amqps://user:***@broker.example:5671/%2f?heartbeat=10",
            ),
            ("amqp://user:pa@ss@host/vh", "amqp://user:***@host/vh"),
            ("amqp://user@host/", "amqp://user@host/"),
            ("amqp://host", "amqp://host"),
            ("amqp://host:5672/vh", "amqp://host:5672/vh"),
            ("http://[::1]:8123", "http://[::1]:8123"),
            ("not a url user:secret", "not a url user:secret"),
            // No `@`: a non-numeric "port" may be a password that lost its `@`.
            ("amqp://u:secret", "amqp://u:***"),
            ("amqp://u:pa/ss", "amqp://u:***"),
            ("u:secret@host:8123", "u:***@host:8123"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "redacting {url}");
        }
    }

    /// Passwords that should have been percent-encoded and were not, and others: none
    /// survives redaction, in a well-formed URL or a broken one.
    #[test]
    fn every_password_shape_is_hidden() {
        let passwords = [
            "pa/ss",
            "p#w",
            "p?w",
            "p@w",
            "p@@w@",
            "p:w:x",
            "p%w",
            "p%40w",
            "sec ret",
            " lead",
            "pässwörd-ü",
            "密码🔑",
            "a/b?c#d@e:f%g h",
            "/@@//",
            "x@host/",
        ];
        let shapes = [
            "amqp://user:{}@localhost:5672/",
            "amqps://user:{}@broker.example/%2f?heartbeat=10#frag",
            "amqp://user:{}@host",
            "http://default:{}@127.0.0.1:8123",
            "https://u:{}@[::1]:8443/?x=1",
            "amqp://user:{}@host:port/",
            "amqp://:{}@host/",
            "user:{}@host:5672",
        ];
        for password in passwords {
            for shape in shapes {
                let url = shape.replace("{}", password);
                let redacted = redact_url(&url);
                assert!(
                    !redacted.contains(password),
                    "{password:?} leaks from {url:?} as {redacted:?}"
                );
                assert_eq!(url_password(&url), Some(password), "in {url:?}");
                assert!(redacted.contains(":***@"), "{redacted:?}");
                let scrubbed = Scrubber::new()
                    .with_url(&url)
                    .scrub(&format!("error: `{url}` at {url}"))
                    .into_owned();
                assert!(!scrubbed.contains(password), "{scrubbed:?}");
            }
        }
    }

    #[test]
    fn scrubber_hides_decoded_and_encoded_forms() {
        let scrubber = Scrubber::new().with_url("amqp://u:p%40ss%20w@host/");
        assert_eq!(
            scrubber.scrub("a p%40ss%20w b p@ss w c p%2540ss%2520w"),
            "a *** b *** c ***"
        );
        let scrubber = Scrubber::new().with_secret("p@ss w");
        assert_eq!(scrubber.scrub("x p%40ss%20w y p@ss w"), "x *** y ***");
        let scrubber = Scrubber::new().with_secret("").with_url("amqp://host/");
        assert!(scrubber.is_empty());
        assert_eq!(scrubber.scrub("amqp://host/"), "amqp://host/");
        assert!(!format!("{scrubber:?}").contains("host"));
    }

    #[test]
    fn shown_url_only_when_safe() {
        assert_eq!(
            shown_url("amqp://u:p#w@host:x/").as_deref(),
            Some("amqp://u:***@host:x/")
        );
        assert_eq!(shown_url("u:secret@host"), None);
        assert_eq!(shown_url("garbage secret"), None);
        // The password also appears elsewhere in the value: not shown at all.
        assert_eq!(shown_url("amqp://u:host@host/"), None);
    }
}
