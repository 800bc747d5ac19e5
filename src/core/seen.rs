//! What the bus saw at run time for [`Bus::topology`](crate::Bus::topology): which source (the
//! application, a group's handler, a command handler) published which event type and sent
//! which command.
//!
//! Each (source, event type) pair is written down once, the first time it happens. Whether it
//! happened is one bit per source, kept in the event type's route (and per command type here),
//! so that a publish only reads a bit its route already holds: no lock, no hash, no write after
//! the first time.

use std::any::TypeId;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use super::route::Route;
use super::Core;
use crate::command::Command;
use crate::event::Event;

/// A source's index among the bus's sources.
pub(crate) type SourceId = u32;

/// The application, outside any handler.
pub(crate) const EXTERNAL: SourceId = 0;

/// Who may publish and request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceName {
    External,
    /// A consumer group's handler, by the group's name.
    Group(String),
    /// A command's handler, by the command's type name.
    Command(&'static str),
}

/// What a source did, written down once per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Sighting {
    Published {
        topic: &'static str,
        event: &'static str,
    },
    Requested {
        command: &'static str,
    },
}

/// The sources of a bus, and what each was seen doing.
pub(crate) struct Sightings {
    /// By [`SourceId`]; the first is [`SourceName::External`].
    sources: Vec<SourceName>,
    /// Per command type: who sent it.
    requests: FxHashMap<TypeId, SourceSet>,
    seen: parking_lot::Mutex<Vec<(SourceId, Sighting)>>,
}

impl Sightings {
    /// The application, then `sources`; `commands` are the command types with a handler.
    pub(crate) fn new(
        sources: impl IntoIterator<Item = SourceName>,
        commands: impl IntoIterator<Item = TypeId>,
    ) -> Self {
        let sources: Vec<SourceName> = std::iter::once(SourceName::External)
            .chain(sources)
            .collect();
        let requests = commands
            .into_iter()
            .map(|c| (c, SourceSet::new(sources.len())))
            .collect();
        Sightings {
            sources,
            requests,
            seen: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// How many sources there are.
    pub(crate) fn len(&self) -> usize {
        self.sources.len()
    }

    /// The source of consumer group `group`'s handler (the application, should there be none).
    pub(crate) fn group(&self, group: &str) -> SourceId {
        self.find(|s| matches!(s, SourceName::Group(g) if g == group))
    }

    /// The source of the handler of the command type named `command`.
    pub(crate) fn command(&self, command: &str) -> SourceId {
        self.find(|s| matches!(s, SourceName::Command(c) if *c == command))
    }

    fn find(&self, is: impl Fn(&SourceName) -> bool) -> SourceId {
        self.sources
            .iter()
            .position(is)
            .map_or(EXTERNAL, |i| i as SourceId)
    }

    /// Every source's name and what it was seen doing, in the order seen.
    pub(crate) fn snapshot(&self) -> Vec<(SourceName, Sighting)> {
        self.seen
            .lock()
            .iter()
            .map(|&(source, what)| (self.sources[source as usize].clone(), what))
            .collect()
    }

    #[cold]
    #[inline(never)]
    fn write_down(&self, source: SourceId, what: Sighting) {
        self.seen.lock().push((source, what));
    }
}

/// One bit per source: which sources did something. The application's bit (the first) is in
/// the struct itself, so that checking it reads no other memory.
pub(crate) struct SourceSet {
    first: AtomicU64,
    rest: Box<[AtomicU64]>,
}

impl SourceSet {
    pub(crate) fn new(sources: usize) -> Self {
        SourceSet {
            first: AtomicU64::new(0),
            rest: (64..sources)
                .step_by(64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Marks `source`; whether it was not marked before (only one caller gets `true`).
    #[inline]
    fn mark(&self, source: SourceId) -> bool {
        let word = match source / 64 {
            0 => &self.first,
            n => match self.rest.get(n as usize - 1) {
                Some(word) => word,
                None => return false,
            },
        };
        let bit = 1u64 << (source % 64);
        // Read first: after the first time, a publish writes nothing.
        word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

impl Core {
    /// Notes that `source` published an `E` (the first time only).
    #[inline]
    pub(crate) fn saw_publish<E: Event>(&self, route: &Route, source: SourceId) {
        if route.seen.mark(source) {
            self.sightings.write_down(
                source,
                Sighting::Published {
                    topic: E::TOPIC,
                    event: E::NAME,
                },
            );
        }
    }

    /// Notes that `source` sent a `C` (the first time only; a command without a handler is
    /// not noted).
    #[inline]
    pub(crate) fn saw_request<C: Command>(&self, source: SourceId) {
        let Some(set) = self.sightings.requests.get(&TypeId::of::<C>()) else {
            return;
        };
        if set.mark(source) {
            self.sightings.write_down(
                source,
                Sighting::Requested {
                    command: std::any::type_name::<C>(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_marked_once() {
        let set = SourceSet::new(130);
        for source in [0, 1, 63, 64, 127, 128, 129] {
            assert!(set.mark(source), "{source} first");
            assert!(!set.mark(source), "{source} again");
        }
        assert!(!set.mark(192), "past the last word");
        let small = SourceSet::new(1);
        assert!(small.mark(0));
        assert!(!small.mark(64), "no such source");
    }
}
