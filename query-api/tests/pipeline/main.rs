//! The whole loop with real Postgres and a real broker: command API → event store → relay →
//! Kafka → projector → read models → query API.

mod analysts;
mod audit;
mod contract;
mod faults;
mod graphiql;
mod graphql;
mod loop_;
mod queries;
mod reads;
mod rebuild;
mod system;
mod tenants;
mod transfers;
mod walkthrough;
