//! Property tests that also show they reached the code they are named after.
//!
//! A generator that never yields a case the code under test acts on lets every assertion pass
//! without running: the session's property once started before login, so it never asked for a
//! pinhole and none of its checks ran. [`check`] runs a property as `proptest!` does, and then
//! fails unless enough of the generated cases said they got where the test's name says.

use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;
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

/// One edit of a well-formed input, as a careless sender or an attacker might make it: none
/// (half the time), or one character replaced, inserted or removed. Near misses are built as
/// structured values and then edited, so that they sit right at the parser's edges; random
/// strings from a near alphabet almost never come close enough to parse.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    None,
    Replace(Index, char),
    Insert(Index, char),
    Remove(Index),
}

impl Edit {
    /// `text` with the edit made (at a character boundary).
    pub(crate) fn apply(&self, text: &str) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let at = |i: &Index, len: usize| (len > 0).then(|| i.index(len));
        match self {
            Edit::None => {}
            Edit::Replace(i, c) => {
                if let Some(at) = at(i, chars.len()) {
                    chars[at] = *c;
                }
            }
            Edit::Insert(i, c) => chars.insert(i.index(chars.len() + 1), *c),
            Edit::Remove(i) => {
                if let Some(at) = at(i, chars.len()) {
                    chars.remove(at);
                }
            }
        }
        chars.into_iter().collect()
    }

    pub(crate) fn is_none(&self) -> bool {
        matches!(self, Edit::None)
    }
}

/// An [`Edit`], with characters from the alphabet of host-port and EPRT arguments.
pub(crate) fn edit() -> impl Strategy<Value = Edit> {
    let c = || prop::sample::select("0123456789,.|!:+- \tafx\u{ff}".chars().collect::<Vec<_>>());
    prop_oneof![
        3 => Just(Edit::None),
        1 => (any::<Index>(), c()).prop_map(|(i, c)| Edit::Replace(i, c)),
        1 => (any::<Index>(), c()).prop_map(|(i, c)| Edit::Insert(i, c)),
        1 => any::<Index>().prop_map(Edit::Remove),
    ]
}
