//! Integration tests against real RabbitMQ and ClickHouse servers, started once for this
//! test binary by `click-consumer-testkit` (install them with
//! `scripts/install-services.sh`). Every test uses its own exchange, queue and database.

mod cluster;
mod common;
mod consume;
mod failover;
mod faults;
mod publisher;
mod schema;
mod tls;
mod topology;
