//! Integration tests against real RabbitMQ and ClickHouse servers, started once for this
//! test binary by `click-consumer-testkit` (install them with
//! `scripts/install-services.sh`). Every test uses its own exchange, queue and database.

mod cluster;
mod columns;
mod common;
mod consume;
mod dead_letters;
mod deprecated;
mod failover;
mod faults;
mod flow;
mod publisher;
mod schema;
mod tls;
mod topology;
