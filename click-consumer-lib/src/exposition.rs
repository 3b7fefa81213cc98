//! The classic Prometheus text format (0.0.4), converted from the OpenMetrics text that
//! `prometheus-client` writes, for scrapers and tools that read only the classic format
//! (`promtool check metrics` before Prometheus 2.43, older agents).
//!
//! The conversion is generic: it reads whatever families the registry holds, so new
//! metrics need nothing here. Per family it
//! - names `# HELP` and `# TYPE` after the sample name for counters (`x_total`) and info
//!   metrics (`x_info`, typed `gauge`), since the classic format has no family suffixes;
//! - drops `# UNIT`, `# EOF`, `_created` samples and exemplars;
//! - maps the OpenMetrics-only types (`info`, `stateset` to `gauge`; `gaugehistogram`,
//!   `unknown` to `untyped`) and keeps `counter`, `gauge`, `histogram`, `summary`;
//! - rewrites timestamps from seconds to milliseconds and unescapes `\"` in help text.

use std::collections::HashMap;

use crate::metrics::Metrics;

impl Metrics {
    /// The metrics in the classic Prometheus text format, version 0.0.4; serve it with
    /// [`Metrics::CLASSIC_CONTENT_TYPE`]. [`Metrics::encode`] is the OpenMetrics form.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }

    /// The content type of [`Metrics::encode_classic`]'s output.
    pub const CLASSIC_CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";
}

/// Converts an OpenMetrics text exposition into the classic text format 0.0.4.
pub(crate) fn to_classic(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = types.get(name).copied().unwrap_or("unknown");
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {} {help}\n", classic_name(name, kind)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            out.push_str(&format!(
                "# TYPE {} {}\n",
                classic_name(name, kind),
                classic_type(kind)
            ));
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF` and other comments have no classic counterpart.
        } else if let Some(sample) = sample(line) {
            out.push_str(&sample);
            out.push('\n');
        }
    }
    out
}

/// The classic family name: counters and info metrics are named after their samples.
fn classic_name(name: &str, kind: &str) -> String {
    let suffix = match kind {
        "counter" => "_total",
        "info" => "_info",
        _ => return name.to_owned(),
    };
    if name.ends_with(suffix) {
        name.to_owned()
    } else {
        format!("{name}{suffix}")
    }
}

fn classic_type(kind: &str) -> &'static str {
    match kind {
        "counter" => "counter",
        "gauge" | "info" | "stateset" => "gauge",
        "histogram" => "histogram",
        "summary" => "summary",
        _ => "untyped",
    }
}

/// One sample line without its exemplar, its timestamp in milliseconds; `None` for the
/// `_created` samples, which the classic format lacks.
fn sample(line: &str) -> Option<String> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.ends_with("_created") {
        return None;
    }
    let labels_end = if line[name_end..].starts_with('{') {
        name_end + label_set_len(&line[name_end..])
    } else {
        name_end
    };
    let mut fields = line[labels_end..].split_whitespace();
    let value = fields.next()?;
    let mut out = format!("{} {value}", &line[..labels_end]);
    // After the value: an optional timestamp, then an optional `# {labels} value` exemplar.
    if let Some(timestamp) = fields.next().filter(|f| *f != "#")
        && let Ok(seconds) = timestamp.parse::<f64>()
    {
        out.push_str(&format!(" {}", (seconds * 1000.0).round() as i64));
    }
    Some(out)
}

/// The length of the `{...}` label set at the start of `text`, quotes and escapes
/// respected (a label value may hold `}`, `#` or spaces).
fn label_set_len(text: &str) -> usize {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return i + 1,
            _ => {}
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::{
        encoding::text::encode,
        metrics::{
            counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info,
        },
        registry::{Registry, Unit},
    };

    #[test]
    fn counters_are_named_after_their_samples_without_unit_eof_or_created() {
        let om = "\
# HELP app_requests Requests served.
# TYPE app_requests counter
# UNIT app_requests requests
app_requests_total{path=\"/a\"} 3
app_requests_created{path=\"/a\"} 1700000000.5
# EOF
";
        assert_eq!(
            to_classic(om),
            "\
# HELP app_requests_total Requests served.
# TYPE app_requests_total counter
app_requests_total{path=\"/a\"} 3
"
        );
    }

    #[test]
    fn exemplars_are_dropped_and_timestamps_become_milliseconds() {
        let om = "\
# HELP lat Latency \\\"p\\\" \\\\ here.
# TYPE lat histogram
lat_bucket{le=\"0.5\"} 1 # {trace_id=\"a } # b\"} 0.3 1700000000.25
lat_bucket{le=\"+Inf\",x=\"q\\\"}\"} 2 1700000000.5 # {trace_id=\"c\"} 0.9
lat_sum 1.2
lat_count 2
# EOF
";
        assert_eq!(
            to_classic(om),
            "\
# HELP lat Latency \"p\" \\\\ here.
# TYPE lat histogram
lat_bucket{le=\"0.5\"} 1
lat_bucket{le=\"+Inf\",x=\"q\\\"}\"} 2 1700000000500
lat_sum 1.2
lat_count 2
"
        );
    }

    #[test]
    fn openmetrics_only_types_map_to_classic_ones() {
        let om = "\
# HELP build Build info.
# TYPE build info
build_info{version=\"1\"} 1
# TYPE mode stateset
mode{mode=\"a\"} 1
# TYPE odd unknown
odd 4
# TYPE q gaugehistogram
q_gcount 1
";
        assert_eq!(
            to_classic(om),
            "\
# HELP build_info Build info.
# TYPE build_info gauge
build_info{version=\"1\"} 1
# TYPE mode gauge
mode{mode=\"a\"} 1
# TYPE odd untyped
odd 4
# TYPE q untyped
q_gcount 1
"
        );
    }

    /// The registry as `prometheus-client` really writes it: every family, with its
    /// labels, HELP and TYPE named as the classic format wants.
    #[test]
    fn a_real_registry_converts_completely() {
        let mut registry = Registry::with_prefix("t");
        let counter: Family<Vec<(String, String)>, Counter> = Family::default();
        counter
            .get_or_create(&vec![("reason".into(), "a \"b\"\\c".into())])
            .inc_by(2);
        registry.register("events", "Events seen", counter);
        let gauge: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        gauge.set(1.5);
        registry.register_with_unit("last", "Last time", Unit::Seconds, gauge);
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.5);
        registry.register("duration", "Durations", histogram);
        registry.register(
            "build",
            "Build",
            Info::new(vec![("v".to_owned(), "1".to_owned())]),
        );
        let mut om = String::new();
        encode(&mut om, &registry).unwrap();

        let classic = to_classic(&om);
        assert_eq!(
            classic,
            "\
# HELP t_events_total Events seen.
# TYPE t_events_total counter
t_events_total{reason=\"a \\\"b\\\"\\\\c\"} 2
# HELP t_last_seconds Last time.
# TYPE t_last_seconds gauge
t_last_seconds 1.5
# HELP t_duration Durations.
# TYPE t_duration histogram
t_duration_sum 0.5
t_duration_count 1
t_duration_bucket{le=\"0.1\"} 0
t_duration_bucket{le=\"1.0\"} 1
t_duration_bucket{le=\"+Inf\"} 1
# HELP t_build_info Build.
# TYPE t_build_info gauge
t_build_info{v=\"1\"} 1
",
            "from:\n{om}"
        );
    }

    #[test]
    fn every_sample_of_the_consumer_has_help_and_type_in_classic_form() {
        let m = Metrics::new();
        let classic = m.encode_classic();
        let mut described = std::collections::HashSet::new();
        for line in classic.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                described.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| described.contains(*f)))
                    .unwrap_or(name);
                assert!(
                    described.contains(family),
                    "{name} has no HELP in\n{classic}"
                );
            }
        }
        assert!(described.contains("click_consumer_messages_received_total"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
    }
}
