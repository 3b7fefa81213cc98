//! Several addresses for one service: the comma-separated lists of `RABBITMQ_URL` and
//! `CLICKHOUSE_URL`, which entry is in use, and moving on to the next one when it fails.
//!
//! Each process starts at a random entry, so that replicas of the consumer spread over
//! the nodes (as Spring AMQP's shuffled `addresses` and Redpanda Connect's `urls` do). The
//! entry in use is logged on every switch and exported as the gauge
//! `click_consumer_node_in_use{service, node}` (1 for the node in use, 0 for the others).
//! Node names are `host:port`: never a password.

use std::{
    fmt,
    hash::{BuildHasher, RandomState},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
};

use crate::secret::redact_url;

/// The label set of `click_consumer_node_in_use`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NodeLabel {
    service: &'static str,
    node: String,
}

/// The gauge family behind `click_consumer_node_in_use`.
pub(crate) type NodeGauge = Family<NodeLabel, Gauge>;

/// The entries of a comma-separated list, trimmed, empty ones dropped. A comma inside a
/// password must be percent-encoded (`%2C`), as any reserved character in a URL.
pub(crate) fn split(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect()
}

/// `list` with the password of every entry replaced by `***`. An entry without a scheme
/// that holds an `@` (a piece of a URL cut at a comma) is masked up to the `@`.
pub(crate) fn redact_list(list: &str) -> String {
    list.split(',')
        .map(|entry| {
            if entry.contains("://") {
                redact_url(entry)
            } else if let Some(at) = entry.rfind('@') {
                format!("***{}", &entry[at..])
            } else {
                entry.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `host:port` of a URL (its authority without the user part), for logs and labels.
pub(crate) fn node_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

/// A list of interchangeable nodes of one service and the one in use. Shared by every
/// task of a consumer (it is `Sync`); switching is a compare-and-swap, so that two tasks
/// failing on the same node move on once, not twice.
pub(crate) struct Endpoints<T> {
    service: &'static str,
    nodes: Vec<(String, T)>,
    current: AtomicUsize,
    gauge: OnceLock<NodeGauge>,
}

impl<T> fmt::Debug for Endpoints<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints")
            .field("service", &self.service)
            .field(
                "nodes",
                &self.nodes.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> Endpoints<T> {
    /// `nodes` as `(name, value)` pairs, in the configured order; `nodes` must not be
    /// empty. The first node in use is drawn at random.
    pub(crate) fn new(service: &'static str, nodes: Vec<(String, T)>) -> Self {
        assert!(!nodes.is_empty(), "an endpoint list is never empty");
        let start = random_below(nodes.len());
        Endpoints {
            service,
            nodes,
            current: AtomicUsize::new(start),
            gauge: OnceLock::new(),
        }
    }

    /// Exports the node in use through `gauge` (once; later calls are ignored).
    pub(crate) fn report_to(&self, gauge: &NodeGauge) {
        if self.gauge.set(gauge.clone()).is_ok() {
            self.set_gauge(self.current());
        }
    }

    /// How many nodes there are.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The index of the node in use.
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// The node at `index` (taken modulo the length) and its name.
    pub(crate) fn get(&self, index: usize) -> (&str, &T) {
        let (name, value) = &self.nodes[index % self.nodes.len()];
        (name, value)
    }

    /// The node in use and its name.
    pub(crate) fn in_use(&self) -> (usize, &str, &T) {
        let index = self.current();
        let (name, value) = self.get(index);
        (index, name, value)
    }

    /// The node after `failed`, made the node in use if `failed` still was (another task
    /// may have moved on already). Logs the switch. Returns the index now in use.
    pub(crate) fn advance(&self, failed: usize, why: &dyn fmt::Display) -> usize {
        let next = (failed + 1) % self.nodes.len();
        if next != failed && self.swap(failed, next) {
            log::warn!(
                "{}: leaving node {} ({why}); now using node {}",
                self.service,
                self.nodes[failed].0,
                self.nodes[next].0
            );
        }
        self.current()
    }

    /// Makes `index` the node in use (after it answered), logging the switch if it is one.
    pub(crate) fn settle_on(&self, index: usize) {
        let before = self.current();
        if before != index && self.swap(before, index) {
            log::info!(
                "{}: now using node {} (was {})",
                self.service,
                self.nodes[index].0,
                self.nodes[before].0
            );
        }
    }

    fn swap(&self, from: usize, to: usize) -> bool {
        let swapped = self
            .current
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if swapped {
            self.set_gauge(to);
        }
        swapped
    }

    fn set_gauge(&self, in_use: usize) {
        let Some(gauge) = self.gauge.get() else {
            return;
        };
        for (index, (node, _)) in self.nodes.iter().enumerate() {
            let label = NodeLabel {
                service: self.service,
                node: node.clone(),
            };
            gauge.get_or_create(&label).set(i64::from(index == in_use));
        }
    }
}

/// A number in `0..n`, different from process to process.
fn random_below(n: usize) -> usize {
    let random = RandomState::new().hash_one(std::process::id());
    (random % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Endpoints<u8> {
        Endpoints::new(
            "test",
            vec![("a:1".into(), 1), ("b:2".into(), 2), ("c:3".into(), 3)],
        )
    }

    #[test]
    fn lists_split_on_commas() {
        assert_eq!(split("amqp://a/, amqp://b/ ,,"), ["amqp://a/", "amqp://b/"]);
        assert_eq!(split("http://x:8123"), ["http://x:8123"]);
        assert!(split(" , ").is_empty());
    }

    #[test]
    fn every_entry_is_redacted() {
        let shown = redact_list("amqp://u:first@a:5672/,amqp://u:second@b:5672/,amqp://c/");
        assert_eq!(shown, "amqp://u:***@a:5672/,amqp://u:***@b:5672/,amqp://c/");
        // A comma inside a password cuts an entry: the piece before the @ is hidden.
        let shown = redact_list("amqp://u:pa,ss-secret@a:5672/");
        assert!(!shown.contains("ss-secret"), "{shown}");
    }

    #[test]
    fn node_names_have_no_credentials() {
        assert_eq!(
            node_name("amqp://u:secret@rabbit-1:5672/vh"),
            "rabbit-1:5672"
        );
        assert_eq!(node_name("http://ch-2:8123"), "ch-2:8123");
        assert_eq!(node_name("https://u:p@ch:8443/?x=1"), "ch:8443");
    }

    #[test]
    fn advancing_moves_once_and_wraps() {
        let e = three();
        let start = e.current();
        let next = e.advance(start, &"refused");
        assert_eq!(next, (start + 1) % 3);
        // A second task that failed on the same node does not skip a node.
        assert_eq!(e.advance(start, &"refused"), next);
        let after = e.advance(next, &"refused");
        assert_eq!(after, (start + 2) % 3);
        assert_eq!(e.advance(after, &"refused"), start);
    }

    #[test]
    fn the_gauge_marks_the_node_in_use() {
        let e = three();
        let gauge = NodeGauge::default();
        e.report_to(&gauge);
        let value = |node: &str| {
            gauge
                .get_or_create(&NodeLabel {
                    service: "test",
                    node: node.to_owned(),
                })
                .get()
        };
        e.settle_on(1);
        assert_eq!((value("a:1"), value("b:2"), value("c:3")), (0, 1, 0));
        e.advance(1, &"gone");
        assert_eq!((value("a:1"), value("b:2"), value("c:3")), (0, 0, 1));
    }

    #[test]
    fn starts_spread_over_the_nodes() {
        let starts: std::collections::HashSet<usize> = (0..64).map(|_| three().current()).collect();
        assert!(starts.len() > 1, "64 lists all started at {starts:?}");
    }
}
