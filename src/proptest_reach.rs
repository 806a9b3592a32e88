//! Property tests that also show they reached the code they are named after.
//!
//! A generator that never yields a case the code under test acts on lets every assertion pass
//! without running: the session's property once started before login, so it never asked for a
//! pinhole and none of its checks ran. [`check`] runs a property as `proptest!` does, and then
//! fails unless enough of the generated cases said they got where the test's name says.

use std::cell::Cell;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Runs `property` on cases from `strategy` (`PROPTEST_CASES` of them, 256 by default). The
/// property returns whether its case reached `what`; at least `min_percent` % of the cases,
/// and never fewer than one, must have.
pub(crate) fn check<S: Strategy>(
    what: &str,
    min_percent: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    // No regression file: these run from the library's unit tests, where proptest cannot
    // tell which source file to write one beside.
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let (cases, reached) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&strategy, |value| {
        let hit = property(value)?;
        cases.set(cases.get() + 1);
        reached.set(reached.get() + u32::from(hit));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (cases, reached) = (cases.get(), reached.get());
    assert!(
        reached > 0 && reached * 100 >= cases * min_percent,
        "only {reached} of {cases} generated cases reached {what} (at least {min_percent} % must)"
    );
}
