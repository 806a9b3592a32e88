//! A restart that drops nobody: `ftp-alg run --take-over` (bodies in `common::handover`).

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::handover;

#[test]
fn upgrade_under_load_drops_nobody() {
    handover::upgrade_under_load_drops_nobody();
}
