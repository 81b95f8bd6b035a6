//! Expansion of `#[skyward::main]`.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{Block, ItemFn, parse_quote};

/// Expand the attribute; on error, the error and the untouched item.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(item);
            return out;
        }
    };
    let flavor = match parse_flavor(attr) {
        Ok(f) => f,
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(func.into_token_stream());
            return out;
        }
    };
    match expand_main_with(func.clone(), flavor) {
        Ok(f) => f.into_token_stream(),
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(func.into_token_stream());
            out
        }
    }
}

/// The tokio runtime `#[skyward::main]` runs an `async fn main` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// `flavor = "multi_thread"` (the default): a worker thread per CPU.
    MultiThread,
    /// `flavor = "current_thread"`: everything on the main thread; the lowest latency for a
    /// program that makes one call at a time (docs/benchmarks.md).
    CurrentThread,
}

/// Nothing (`None`), `flavor = "multi_thread"` or `flavor = "current_thread"`, as
/// `#[tokio::main]` spells it (a trailing comma allowed).
pub(crate) fn parse_flavor(attr: TokenStream) -> syn::Result<Option<Flavor>> {
    use syn::parse::Parser;
    const USE: &str = "use `flavor = \"multi_thread\"` (the default) or `flavor = \"current_thread\"`";
    let span = attr.span();
    let args = syn::punctuated::Punctuated::<syn::MetaNameValue, syn::Token![,]>::parse_terminated
        .parse2(attr)
        .map_err(|_| syn::Error::new(span, format!("#[skyward::main] takes no arguments, or one: {USE}")))?;
    let mut flavor = None;
    for arg in &args {
        if !arg.path.is_ident("flavor") {
            return Err(syn::Error::new(arg.path.span(), format!("#[skyward::main] knows one argument, `flavor`: {USE}")));
        }
        if flavor.is_some() {
            return Err(syn::Error::new(arg.path.span(), "`flavor` given twice"));
        }
        flavor = Some(match &arg.value {
            syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) => match s.value().as_str() {
                "multi_thread" => Flavor::MultiThread,
                "current_thread" => Flavor::CurrentThread,
                other => return Err(syn::Error::new(s.span(), format!("unknown flavor `{other}`: {USE}"))),
            },
            other => return Err(syn::Error::new(other.span(), format!("`flavor` takes a string: {USE}"))),
        });
    }
    Ok(flavor)
}

#[cfg(test)]
pub(crate) fn expand_main(func: ItemFn) -> syn::Result<ItemFn> {
    expand_main_with(func, None)
}

/// `flavor`: the one the attribute named, if any (a plain `fn main` takes none: it has no runtime).
pub(crate) fn expand_main_with(mut func: ItemFn, flavor: Option<Flavor>) -> syn::Result<ItemFn> {
    if func.sig.asyncness.is_none() {
        if flavor.is_some() {
            return Err(syn::Error::new(func.sig.fn_token.span(), "`flavor` is for an `async fn main`; this `main` runs no runtime"));
        }
        func.block.stmts.insert(0, parse_quote!(::skyward::init();));
        return Ok(func);
    }
    let sig = &func.sig;
    if !sig.inputs.is_empty() {
        return Err(syn::Error::new(sig.inputs.span(), "#[skyward::main] goes on a `main` without arguments"));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(sig.generics.span(), "#[skyward::main] goes on a non-generic `main`"));
    }
    if let Some(u) = &sig.unsafety {
        return Err(syn::Error::new(u.span(), "#[skyward::main] cannot go on an `unsafe fn`"));
    }
    func.sig.asyncness = None;
    let body = &func.block;
    let block: Block = match flavor.unwrap_or(Flavor::MultiThread) {
        Flavor::MultiThread => parse_quote!({
            ::skyward::init();
            ::skyward::__private::tokio_main(async move #body)
        }),
        Flavor::CurrentThread => parse_quote!({
            ::skyward::init();
            ::skyward::__private::tokio_main_current_thread(async move #body)
        }),
    };
    func.block = Box::new(block);
    Ok(func)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn expanded(item: ItemFn) -> String {
        match expand_main(item) {
            Ok(f) => f.into_token_stream().to_string(),
            Err(e) => panic!("valid: {e}"),
        }
    }

    #[test]
    fn async_main_runs_on_tokio() {
        let out = expanded(parse_quote!(
            async fn main() -> anyhow::Result<()> {
                run().await?;
                Ok(())
            }
        ));
        let want = quote!(
            fn main() -> anyhow::Result<()> {
                ::skyward::init();
                ::skyward::__private::tokio_main(async move {
                    run().await?;
                    Ok(())
                })
            }
        );
        assert_eq!(out, want.to_string());
    }

    #[test]
    fn current_thread_flavor_picks_the_current_thread_runtime() {
        let flavor = parse_flavor(quote!(flavor = "current_thread")).expect("valid");
        assert_eq!(flavor, Some(Flavor::CurrentThread));
        assert_eq!(parse_flavor(quote!(flavor = "multi_thread")).expect("valid"), Some(Flavor::MultiThread));
        assert_eq!(parse_flavor(quote!()).expect("valid"), None);
        assert_eq!(parse_flavor(quote!(flavor = "current_thread",)).expect("trailing comma"), Some(Flavor::CurrentThread));
        let out = match expand_main_with(
            parse_quote!(
                async fn main() {
                    run().await;
                }
            ),
            flavor,
        ) {
            Ok(f) => f.into_token_stream().to_string(),
            Err(e) => panic!("valid: {e}"),
        };
        let want = quote!(
            fn main() {
                ::skyward::init();
                ::skyward::__private::tokio_main_current_thread(async move {
                    run().await;
                })
            }
        );
        assert_eq!(out, want.to_string());
    }

    #[test]
    fn unknown_flavors_and_arguments_are_refused() {
        for attr in [
            quote!(flavor = "x"),
            quote!(flavor = 1),
            quote!(threads = "2"),
            quote!(current_thread),
            quote!(flavor = "current_thread", flavor = "multi_thread"),
        ] {
            let out = expand(
                attr.clone(),
                quote!(
                    async fn main() {}
                ),
            )
            .to_string();
            assert!(out.contains("compile_error"), "{attr}: {out}");
        }
        let sync_main = expand(
            quote!(flavor = "current_thread"),
            quote!(
                fn main() {}
            ),
        )
        .to_string();
        assert!(sync_main.contains("compile_error"), "{sync_main}");
    }

    #[test]
    fn sync_main_gets_init_first() {
        let out = expanded(parse_quote!(
            fn main() {
                work();
            }
        ));
        assert_eq!(
            out,
            quote!(
                fn main() {
                    ::skyward::init();
                    work();
                }
            )
            .to_string()
        );
    }

    #[test]
    fn rejects_arguments_and_attribute_arguments() {
        assert!(
            expand_main(parse_quote!(
                async fn main(x: u8) {}
            ))
            .is_err()
        );
        assert!(
            expand_main(parse_quote!(
                async fn main<T>() {}
            ))
            .is_err()
        );
    }
}
