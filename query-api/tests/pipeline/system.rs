//! The pipeline tests run the one harness of the whole system: see the `test-system` crate.

pub(crate) use test_system::{TENANT, TestSystem as System, problem, token};
