//! `#[skyward::function]` and `#[skyward::main]`: the attribute macros of Skyward.
//!
//! These macros are re-exported by the `skyward` facade crate; the code they generate refers only
//! to `::skyward::...` paths (and `::core` / `::std`), so a user crate depends on `skyward` alone.
//!
//! # `#[skyward::function]`
//!
//! Put on a free `async fn` or `fn` (no generics, no `self`, no `impl Trait` or borrowed
//! arguments), it turns the function into a constructor of a typed call and registers its body in
//! the link-time registry. For
//!
//! ```text
//! #[skyward::function]
//! pub async fn add(a: u32, b: u32) -> anyhow::Result<u32> { Ok(a + b) }
//! ```
//!
//! it emits, roughly:
//!
//! ```text
//! #[doc(hidden)]
//! async fn __skyward_body_add(a: u32, b: u32) -> anyhow::Result<u32> { Ok(a + b) }
//!
//! #[must_use = "..."]
//! pub fn add(a: u32, b: u32) -> ::skyward::Call<u32> {
//!     ::skyward::__private::Call::new(concat!(module_path!(), "::", "add"), &(a, b,))
//! }
//!
//! const _: () = {
//!     const NAME: &str = concat!(module_path!(), "::", "add");
//!     #[::skyward::__private::linkme::distributed_slice(::skyward::__private::FUNCTIONS)]
//!     #[linkme(crate = ::skyward::__private::linkme)]
//!     static ENTRY: ::skyward::__private::FunctionEntry = ::skyward::__private::FunctionEntry {
//!         name: NAME,
//!         invoke: ::skyward::__private::Invoke::Unary(|bytes| Box::pin(async move {
//!             let (a, b,) = decode_args::<(u32, u32,)>(NAME, &bytes)?;
//!             let out = __skyward_body_add(a, b).await.map_err(error_to_remote)?;
//!             encode_result(NAME, &out)
//!         })),
//!     };
//! };
//! ```
//!
//! * The call's result type is the return type, except that a return type whose last path segment
//!   is `Result` (`Result<T, E>`, `anyhow::Result<T>`, `std::io::Result<T>`) gives `T`, and an
//!   `Err(e)` is sent back as a remote error (`E: Into<anyhow::Error>`). A bare `Result` without
//!   generic arguments (`std::fmt::Result`) gives `()`.
//! * A function returning `impl Stream<Item = X>` (any path ending in `Stream`, e.g.
//!   `impl futures::Stream<Item = X> + Send`), `BoxStream<'static, X>`, or a `Result` of either, is
//!   a streaming function: the constructor returns `::skyward::StreamCall<X>` and every item is
//!   encoded and sent as it comes. The stream is boxed with `futures::StreamExt::boxed`, so it
//!   must be `Send + 'static`.
//! * A plain `fn` runs on tokio's blocking pool, so its arguments and result must be
//!   `Send + 'static`; the future of an `async fn` must be `Send`.
//! * Arguments must be `Serialize + DeserializeOwned`, the result `Serialize` on the executor
//!   and `DeserializeOwned` on the caller.
//! * `#[skyward::function(name = "custom.name")]` overrides the registered name, which is
//!   otherwise `module::path::function`.
//! * Documentation, `#[must_use]` and `#[deprecated]` stay on the public constructor; `#[cfg]`,
//!   `#[cfg_attr]` and lint attributes are copied to both functions (`expect` becomes `allow` on
//!   the constructor); every other attribute goes to the body.
//!
//! The macro cannot see whether the function sits in an `impl` block: it must be a free function
//! (in a module or a block).
//!
//! # `#[skyward::main]`
//!
//! On `async fn main() -> R`, expands to
//! `fn main() -> R { ::skyward::init(); ::skyward::__private::tokio_main(async move { body }) }`.
//! On a plain `fn main`, inserts `::skyward::init();` as its first statement.

use proc_macro::TokenStream;

mod function;
mod main_fn;
mod signature;

/// Turn an `async fn` or `fn` into a remote function: see the crate documentation.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    function::expand(attr.into(), item.into()).into()
}

/// Initialise Skyward and run an `async fn main` on a multi-threaded tokio runtime, or on a
/// current-thread one with `#[skyward::main(flavor = "current_thread")]` (the lowest latency for a
/// program that makes one call at a time; a program that keeps many calls in flight wants the
/// default). On the current-thread runtime the pool's connections run on `main`'s thread too:
/// blocking code there stalls them (heartbeats stop, and nodes count as lost after
/// `Options::lost_after`), so run blocking work with `tokio::task::spawn_blocking`.
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    main_fn::expand(attr.into(), item.into()).into()
}
