#!/usr/bin/env bash
# Check monitoring/: `promtool check config` on prometheus.yml, `promtool check rules` on
# alerts.yml and `promtool test rules` on alerts.test.yml (a firing and a silent case for
# every rule).
#
# promtool comes from Debian's `prometheus` package (2.42 on bookworm): downloaded with
# `apt-get download` and unpacked into target/promtool/, not installed, so no Prometheus
# service is set up on the machine. Reused while it is there; PROMTOOL=/path overrides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

promtool=${PROMTOOL:-}
if [[ -z $promtool ]]; then
    dir=$PWD/target/promtool
    promtool=$dir/usr/bin/promtool
    if [[ ! -x $promtool ]]; then
        echo "==> promtool: unpacking Debian's prometheus package into $dir"
        rm -rf "$dir"
        mkdir -p "$dir/deb"
        (cd "$dir/deb" && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; })
        dpkg-deb -x "$dir"/deb/prometheus_*.deb "$dir"
        rm -rf "$dir/deb"
    fi
fi
echo "==> $("$promtool" --version 2>&1 | head -1)"

# prometheus.yml names the rule file by its path inside the container: check it against a
# copy laid out the same way.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/etc/prometheus"
sed "s|/etc/prometheus/|$tmp/etc/prometheus/|" monitoring/prometheus.yml >"$tmp/etc/prometheus/prometheus.yml"
cp monitoring/alerts.yml "$tmp/etc/prometheus/alerts.yml"
"$promtool" check config "$tmp/etc/prometheus/prometheus.yml"

"$promtool" check rules monitoring/alerts.yml

# Every alerting rule must have at least one test case.
mapfile -t rules < <(sed -n 's/^ *- alert: *//p' monitoring/alerts.yml)
for rule in "${rules[@]}"; do
    grep -q "alertname: $rule\$" monitoring/alerts.test.yml \
        || { echo "monitoring/alerts.test.yml: no test for $rule" >&2; exit 1; }
done
echo "every rule has a test: ${rules[*]}"

"$promtool" test rules monitoring/alerts.test.yml
