//! `click-consumer publish-demo`: realistic clicks at a steady rate, for the compose demo.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use click_consumer::{ClickEvent, ClickPublisher, Config};
use tokio_util::sync::CancellationToken;

const USER_AGENTS: [&str; 5] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "curl/8.5.0",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
];
const REFERRERS: [&str; 4] = [
    "",
    "https://news.example/",
    "https://social.example/post/1",
    "https://mail.example/",
];

/// A small deterministic generator (xorshift64*), enough for demo data.
pub(crate) struct Clicks(u64);

impl Clicks {
    pub(crate) fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Clicks(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    /// A click on one of 100 short codes, now.
    pub(crate) fn click(&mut self) -> ClickEvent {
        let code = format!("demo{:02}", self.next() % 100);
        let ip = self.next();
        ClickEvent::now(code.clone())
            .with_user_agent(self.pick(&USER_AGENTS))
            .with_ip_address(format!("203.0.113.{}", ip % 254 + 1))
            .with_referrer(self.pick(&REFERRERS))
            .with_original_url(format!("https://example.com/landing/{code}"))
    }
}

/// Publishes `rate` clicks a second (in ten slices a second) until `count` or `stop`.
pub(crate) async fn run(
    config: Config,
    rate: u32,
    count: u64,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "--rate must be at least 1");
    let publisher = ClickPublisher::connect(&config)
        .await
        .context("cannot start publishing")?;
    log::info!(
        "publishing {rate} demo clicks/s{}",
        if count > 0 {
            format!(", {count} in all")
        } else {
            String::new()
        }
    );
    let mut clicks = Clicks::seeded();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut sent, mut carry) = (0u64, 0u64);
    while count == 0 || sent < count {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        carry += u64::from(rate);
        let mut slice = carry / 10;
        carry %= 10;
        if count > 0 {
            slice = slice.min(count - sent);
        }
        let events: Vec<ClickEvent> = (0..slice).map(|_| clicks.click()).collect();
        publisher.publish_all(&events).await?;
        sent += slice;
    }
    log::info!("published {sent} demo clicks");
    publisher.close().await?;
    Ok(())
}
