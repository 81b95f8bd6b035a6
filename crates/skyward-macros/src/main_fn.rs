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
    if !attr.is_empty() {
        let mut out = syn::Error::new(attr.span(), "#[skyward::main] takes no arguments").into_compile_error();
        out.extend(func.into_token_stream());
        return out;
    }
    match expand_main(func.clone()) {
        Ok(f) => f.into_token_stream(),
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(func.into_token_stream());
            out
        }
    }
}

pub(crate) fn expand_main(mut func: ItemFn) -> syn::Result<ItemFn> {
    if func.sig.asyncness.is_none() {
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
    let block: Block = parse_quote!({
        ::skyward::init();
        ::skyward::__private::tokio_main(async move #body)
    });
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
        let out = expand(
            quote!(flavor = "x"),
            quote!(
                async fn main() {}
            ),
        )
        .to_string();
        assert!(out.contains("compile_error"), "{out}");
    }
}
