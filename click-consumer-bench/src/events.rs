//! Realistic click events, each made from its index alone (same index, same event), so
//! every queue of a run holds the same content without keeping it in memory.
//!
//! Short codes are 6-8 base62 characters from a pool in which a few codes get most
//! clicks; each code always points to the same URL. User agents and referrers are real
//! ones, popular ones more often; addresses are IPv4 and some IPv6; timestamps spread
//! over 30 days in the forms producers send (Python's `isoformat()` without offset and
//! with microseconds, `Z`, `+02:00`).

use click_consumer::ClickEvent;

use crate::time::Utc;

/// Distinct short codes clicked.
const SHORT_CODES: u64 = 20_000;
/// Clicks are spread over 30 days from 2024-01-01T00:00:00Z.
const FIRST_CLICK: i64 = 1_704_067_200;
const SPREAD_SECONDS: u64 = 30 * 24 * 3600;
const BASE62: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Prefix of the latency phase's short codes, followed by the zero-padded sequence
/// number, so that `substring(short_code, 4)` is the number and ordering by short code
/// orders by number.
pub(crate) const SEQUENCE_PREFIX: &str = "seq";
const SEQUENCE_DIGITS: usize = 10;

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36",
    "Twitterbot/1.0",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "curl/8.5.0",
    "python-requests/2.31.0",
];

/// Referrers; the empty ones are clicks without a `Referer` (apps, typed, privacy).
const REFERRERS: &[&str] = &[
    "",
    "https://www.google.com/",
    "",
    "https://t.co/",
    "https://www.facebook.com/",
    "",
    "https://www.linkedin.com/feed/",
    "https://news.ycombinator.com/",
    "android-app://com.slack/",
    "https://www.reddit.com/r/programming/comments/18xq2k1/",
    "https://mail.google.com/",
    "https://duckduckgo.com/",
    "https://www.bing.com/search?q=link+shortener",
];

const SITES: &[&str] = &[
    "https://www.example-shop.com",
    "https://blog.example.org",
    "https://docs.example.dev",
    "https://news.example.net",
    "https://www.example.com",
    "https://events.example.io",
    "https://careers.example.co.uk",
];

/// The `index`-th click of a prefilled queue.
pub(crate) fn click(index: u64) -> ClickEvent {
    let mut rng = Rng::new(index);
    let code = rng.skewed(SHORT_CODES);
    ClickEvent::new(short_code(code), timestamp(&mut rng))
        .with_user_agent(pick(&mut rng, USER_AGENTS))
        .with_ip_address(ip_address(&mut rng))
        .with_referrer(pick(&mut rng, REFERRERS))
        .with_original_url(original_url(code))
}

/// The `index`-th click made about `bytes` long as JSON by a long `original_url` (a
/// tracking query string): a valid click of an unusual size.
pub(crate) fn large_click(index: u64, bytes: usize) -> ClickEvent {
    let mut event = click(index);
    let json_len = serde_json::to_vec(&event).map_or(0, |json| json.len());
    let pad = bytes.saturating_sub(json_len + "&t=".len());
    let mut url = event.original_url;
    url.push_str(if url.contains('?') { "&t=" } else { "?t=" });
    let mut rng = Rng::new(index ^ 0x1a26_e000);
    url.extend((0..pad).map(|_| char::from(BASE62[rng.below(BASE62.len() as u64) as usize])));
    event.original_url = url;
    event
}

/// The `seq`-th click of the latency phase: short code `seq0000000042`, timestamp now.
pub(crate) fn sequenced_click(seq: u64) -> ClickEvent {
    let mut event = click(seq);
    event.short_code = sequence_code(seq);
    event.timestamp = ClickEvent::now("").timestamp;
    event
}

/// `seq` as a short code: [`SEQUENCE_PREFIX`] and the zero-padded number.
pub(crate) fn sequence_code(seq: u64) -> String {
    format!("{SEQUENCE_PREFIX}{seq:0SEQUENCE_DIGITS$}")
}

fn pick<'a>(rng: &mut Rng, choices: &[&'a str]) -> &'a str {
    choices[rng.skewed(choices.len() as u64) as usize]
}

fn short_code(code: u64) -> String {
    let mut rng = Rng::new(code ^ 0x5eed_c0de);
    let len = 6 + code % 3;
    (0..len)
        .map(|_| char::from(BASE62[rng.below(BASE62.len() as u64) as usize]))
        .collect()
}

fn original_url(code: u64) -> String {
    let mut rng = Rng::new(code ^ 0x0b5e_55ed);
    let site = SITES[rng.below(SITES.len() as u64) as usize];
    let id = rng.below(1_000_000);
    match rng.below(5) {
        0 => format!("{site}/products/{id}"),
        1 => format!(
            "{site}/2024/01/how-we-cut-our-cloud-bill-by-{}-percent",
            id % 90
        ),
        2 => format!(
            "{site}/p/{id}?utm_source=newsletter&utm_medium=email&utm_campaign=winter-sale-{}",
            id % 7
        ),
        3 => format!("{site}/docs/v{}/getting-started#install", id % 4 + 1),
        _ => format!("{site}/jobs/{id}-senior-backend-engineer-remote"),
    }
}

fn timestamp(rng: &mut Rng) -> String {
    let seconds = FIRST_CLICK + rng.below(SPREAD_SECONDS) as i64;
    match rng.below(10) {
        0..=6 => format!(
            "{}.{:06}",
            Utc::from_unix(seconds).iso(),
            rng.below(1_000_000)
        ),
        7 | 8 => Utc::from_unix(seconds).rfc3339(),
        _ => format!("{}+02:00", Utc::from_unix(seconds + 7200).iso()),
    }
}

fn ip_address(rng: &mut Rng) -> String {
    if rng.below(5) == 0 {
        return format!(
            "2a02:{:x}:{:x}:{:x}::{:x}",
            rng.below(0x10000),
            rng.below(0x10000),
            rng.below(0x10000),
            rng.below(0x10000)
        );
    }
    let first = match rng.below(222) + 1 {
        10 | 127 => 81,
        octet => octet,
    };
    format!(
        "{first}.{}.{}.{}",
        rng.below(256),
        rng.below(256),
        rng.below(254) + 1
    )
}

/// SplitMix64: small, fast, and good enough to vary test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678_9abc_def0)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// In `0..n`, small values much more often (the square of a uniform draw).
    fn skewed(&mut self, n: u64) -> u64 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((unit * unit * n as f64) as u64).min(n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_varied_and_reproducible() {
        let events: Vec<ClickEvent> = (0..2_000).map(click).collect();
        for event in &events {
            let json = serde_json::to_vec(event).unwrap();
            ClickEvent::decode(&json).unwrap_or_else(|e| panic!("{event:?}: {e}"));
        }
        assert_eq!(click(7), click(7));
        let codes: std::collections::HashSet<_> = events.iter().map(|e| &e.short_code).collect();
        assert!(codes.len() > 200, "{} distinct short codes", codes.len());
        assert!(events.iter().any(|e| e.ip_address.contains(':')));
        assert!(events.iter().any(|e| e.referrer.is_empty()));
        assert!(events.iter().any(|e| e.timestamp.ends_with('Z')));
    }

    #[test]
    fn large_clicks_have_the_size_asked_for_and_are_valid() {
        let event = large_click(3, 700_000);
        let json = serde_json::to_vec(&event).unwrap();
        assert!((699_990..=700_010).contains(&json.len()), "{}", json.len());
        ClickEvent::decode(&json).unwrap();
        assert_eq!(event.short_code, click(3).short_code);
    }

    #[test]
    fn sequence_codes_sort_by_number() {
        assert_eq!(sequence_code(42), "seq0000000042");
        assert!(sequence_code(9) < sequence_code(10));
        let event = sequenced_click(3);
        assert_eq!(&event.short_code[SEQUENCE_PREFIX.len()..], "0000000003");
        ClickEvent::decode(&serde_json::to_vec(&event).unwrap()).unwrap();
    }
}
