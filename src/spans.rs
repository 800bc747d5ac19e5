//! The per-event spans (`tidings.handle`, `tidings.request`), built only when someone could see
//! them.

/// Whether an INFO span made now could be seen: a `tracing` subscriber was set (it then decides
/// per callsite, as always), or none was and the `log` crate takes INFO records (with the `log`
/// feature of `tracing`, which sqlx turns on, a span made without a subscriber is logged
/// through `log`).
///
/// When neither, [`info_span!`] skips the span macro: its fields are not even formatted.
#[inline]
pub(crate) fn observed() -> bool {
    tracing::dispatcher::has_been_set() || log::max_level() >= log::LevelFilter::Info
}

/// `Some(tracing::info_span!(..))`, or `None` when nobody could see the span (see
/// [`observed`]): on the hot path the macro costs ~150 instructions per event even when the
/// span is disabled, and even `Span::none()` costs ~20 to drop. Expanded at the call site, so
/// the span keeps its target and module.
macro_rules! info_span {
    ($($args:tt)*) => {
        if $crate::spans::observed() {
            Some(::tracing::info_span!($($args)*))
        } else {
            None
        }
    };
}
pub(crate) use info_span;
