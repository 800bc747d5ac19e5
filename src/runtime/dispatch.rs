//! How a worker turns a queued event into a handler call: [`Dispatch`], for one event type
//! ([`Typed`]), a set of types ([`Multi`]) or every type of a topic ([`Untyped`]).

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crate::context::Context;
use crate::envelope::{downcast, AnyEnvelope, Envelope, Erased, Metadata};
use crate::event::Event;
use crate::handler::{AnyHandler, Handler, HandlerError};

pub(crate) type Factory<H> = Arc<dyn Fn() -> H + Send + Sync>;

/// How a worker turns a queued event into a handler call.
pub(crate) trait Dispatch: Send + 'static {
    type Env: Send + Sync + 'static;
    fn wrap(item: Erased) -> Option<Self::Env>;
    fn set_attempt(env: &mut Self::Env, attempt: u32);
    /// The envelope, type-erased again (to report a failure).
    fn erase(env: &Self::Env) -> AnyEnvelope;
    /// The envelope back as a queue item (to hand it to the graveyard).
    fn into_item(env: Self::Env) -> Erased;
    /// The typed envelope of an erased one (for the end of a middleware chain).
    fn from_any(env: &AnyEnvelope) -> Option<Self::Env>;
    fn attempt(env: &Self::Env) -> u32;
    fn meta(env: &Self::Env) -> &Metadata;
    fn call<'a>(
        &'a mut self,
        env: &'a Self::Env,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Replaces the handler with a fresh one from the factory.
    fn restart(&mut self) -> bool;
    /// Whether a stored event of this type name is for this subscription.
    fn accepts(name: &str) -> bool;
}

pub(crate) struct Typed<E, H> {
    handler: H,
    factory: Factory<H>,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> Typed<E, H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Typed {
            handler: factory(),
            factory,
            _event: PhantomData,
        }
    }
}

/// Replaces `handler` with a fresh one from `factory`; `false` (the old one kept) if the
/// factory panicked.
fn restart<H>(handler: &mut H, factory: &Factory<H>) -> bool {
    fresh(factory)
        .map(|h| replace_handler(handler, h))
        .is_some()
}

pub(crate) fn fresh<H>(factory: &Factory<H>) -> Option<H> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| factory())) {
        Ok(h) => Some(h),
        Err(panic) => {
            tracing::error!(
                panic = %panic_message(&*panic),
                "handler factory panicked; keeping the previous handler instance"
            );
            None
        }
    }
}

impl<E: Event, H: Handler<E>> Dispatch for Typed<E, H> {
    type Env = Envelope<E>;

    fn wrap(item: Erased) -> Option<Envelope<E>> {
        downcast::<E>(item).map(|inner| Envelope { inner, attempt: 1 })
    }

    fn set_attempt(env: &mut Envelope<E>, attempt: u32) {
        env.attempt = attempt;
    }

    fn erase(env: &Envelope<E>) -> AnyEnvelope {
        env.clone().into()
    }

    fn into_item(env: Envelope<E>) -> Erased {
        env.inner
    }

    fn from_any(env: &AnyEnvelope) -> Option<Envelope<E>> {
        env.downcast::<E>()
    }

    fn attempt(env: &Envelope<E>) -> u32 {
        env.attempt
    }

    fn meta(env: &Envelope<E>) -> &Metadata {
        env.metadata()
    }

    fn call<'a>(
        &'a mut self,
        env: &'a Envelope<E>,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn accepts(name: &str) -> bool {
        name == E::NAME
    }

    fn restart(&mut self) -> bool {
        restart(&mut self.handler, &self.factory)
    }
}

pub(crate) struct Untyped<H> {
    handler: H,
    factory: Factory<H>,
}

impl<H> Untyped<H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Untyped {
            handler: factory(),
            factory,
        }
    }
}

/// The [`Dispatch`] items of a dispatch whose envelope is an [`AnyEnvelope`] ([`Untyped`] and
/// [`Multi`]): the queue item as it is, attempt 1.
macro_rules! any_envelope_items {
    () => {
        type Env = AnyEnvelope;

        fn wrap(item: Erased) -> Option<AnyEnvelope> {
            Some(AnyEnvelope {
                inner: item,
                attempt: 1,
            })
        }

        fn set_attempt(env: &mut AnyEnvelope, attempt: u32) {
            env.attempt = attempt;
        }

        fn erase(env: &AnyEnvelope) -> AnyEnvelope {
            env.clone()
        }

        fn into_item(env: AnyEnvelope) -> Erased {
            env.inner
        }

        fn from_any(env: &AnyEnvelope) -> Option<AnyEnvelope> {
            Some(env.clone())
        }

        fn attempt(env: &AnyEnvelope) -> u32 {
            env.attempt
        }

        fn meta(env: &AnyEnvelope) -> &Metadata {
            env.metadata()
        }
    };
}

impl<H: AnyHandler> Dispatch for Untyped<H> {
    any_envelope_items!();

    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn accepts(_: &str) -> bool {
        true
    }

    fn restart(&mut self) -> bool {
        restart(&mut self.handler, &self.factory)
    }
}

/// How a handler of several event types is called: one entry per type of the set, in the order
/// the set names them. Implemented for tuples of events in `bus::handles`.
pub(crate) trait Table<H>: Send + 'static {
    /// Whether a stored event of this type name is one of the set's.
    fn accepts(name: &str) -> bool;
    /// Calls `H`'s `Handler` impl for the event's type.
    fn call<'a>(
        handler: &'a mut H,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

/// A handler of several event types (a tuple `S` of them), fed a topic's
/// partition in order and dispatched by type to its `Handler<E>` impls.
pub(crate) struct Multi<S, H> {
    handler: H,
    factory: Factory<H>,
    _set: PhantomData<fn() -> S>,
}

impl<S, H> Multi<S, H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Multi {
            handler: factory(),
            factory,
            _set: PhantomData,
        }
    }
}

impl<S: Table<H>, H: Send + 'static> Dispatch for Multi<S, H> {
    any_envelope_items!();

    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        S::call(&mut self.handler, env, ctx)
    }

    fn accepts(name: &str) -> bool {
        S::accepts(name)
    }

    fn restart(&mut self) -> bool {
        restart(&mut self.handler, &self.factory)
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Swaps in a fresh handler; a panic in the old one's `Drop` is caught and logged.
pub(crate) fn replace_handler<H>(slot: &mut H, fresh: H) {
    let old = std::mem::replace(slot, fresh);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(old))) {
        tracing::error!(panic = %panic_message(&*panic), "dropping a panicked handler panicked");
    }
}
