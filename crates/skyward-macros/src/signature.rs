//! Signature analysis: what a function returns, and which of its types a remote call can carry.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{GenericArgument, Path, PathArguments, ReturnType, Type, TypeImplTrait, TypeParamBound, parse_quote};

/// How a remote function returns its value.
pub(crate) enum ReturnKind {
    /// One value of type `output`.
    Unary {
        /// Type the caller decodes.
        output: Type,
        /// The body returns `Result<output, E>`; its `Err` is sent back as a remote error.
        fallible: bool,
    },
    /// A stream of `item`s.
    Stream {
        /// Type of each item.
        item: Type,
        /// The body returns `Result<impl Stream, E>`.
        fallible: bool,
    },
}

/// Classify the return type of a `#[skyward::function]`.
pub(crate) fn classify_return(ret: &ReturnType) -> syn::Result<ReturnKind> {
    let ty = match ret {
        ReturnType::Default => {
            return Ok(ReturnKind::Unary { output: parse_quote!(()), fallible: false });
        }
        ReturnType::Type(_, ty) => ungroup(ty),
    };
    if let Some(item) = stream_item(ty)? {
        return Ok(ReturnKind::Stream { item, fallible: false });
    }
    if let Some(ok) = result_ok_type(ty)? {
        if let Some(item) = stream_item(ungroup(&ok))? {
            return Ok(ReturnKind::Stream { item, fallible: true });
        }
        check_transferable(&ok, "the result type")?;
        return Ok(ReturnKind::Unary { output: ok, fallible: true });
    }
    check_transferable(ty, "the result type")?;
    Ok(ReturnKind::Unary { output: ty.clone(), fallible: false })
}

/// Strip invisible groups and parentheses (`(T)`, or `T` substituted by `macro_rules!`).
pub(crate) fn ungroup(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(g) => ty = &g.elem,
            Type::Paren(p) => ty = &p.elem,
            _ => return ty,
        }
    }
}

fn last_segment_is(path: &Path, name: &str) -> bool {
    path.segments.last().is_some_and(|s| s.ident == name)
}

/// `Some(T)` when `ty` is a path whose last segment is `Result`: its first generic type argument,
/// or `()` for a bare `Result` such as `std::fmt::Result`.
fn result_ok_type(ty: &Type) -> syn::Result<Option<Type>> {
    let Type::Path(tp) = ty else { return Ok(None) };
    if tp.qself.is_some() || !last_segment_is(&tp.path, "Result") {
        return Ok(None);
    }
    let last = tp.path.segments.last().expect("checked above");
    match &last.arguments {
        PathArguments::None => Ok(Some(parse_quote!(()))),
        PathArguments::AngleBracketed(args) => args
            .args
            .iter()
            .find_map(|a| match a {
                GenericArgument::Type(t) => Some(t.clone()),
                _ => None,
            })
            .map(Some)
            .ok_or_else(|| syn::Error::new(args.span(), "expected the success type as the first argument of `Result`")),
        PathArguments::Parenthesized(p) => Err(syn::Error::new(p.span(), "expected `Result<T, E>`")),
    }
}

/// Where to report an error type that cannot become a remote error: the `E` of `Result<T, E>`,
/// or else the return type.
pub(crate) fn error_span(ret: &ReturnType) -> Span {
    let ReturnType::Type(_, ty) = ret else {
        return Span::call_site();
    };
    if let Type::Path(tp) = ungroup(ty)
        && let Some(last) = tp.path.segments.last()
        && let PathArguments::AngleBracketed(args) = &last.arguments
        && let Some(err) = args.args.iter().filter(|a| matches!(a, GenericArgument::Type(_))).nth(1)
    {
        return err.span();
    }
    ty.span()
}

/// `Some(X)` when `ty` is `impl Stream<Item = X>` (any path ending in `Stream`) or
/// `BoxStream<'_, X>`.
fn stream_item(ty: &Type) -> syn::Result<Option<Type>> {
    match ty {
        Type::ImplTrait(it) => impl_stream_item(it).map(Some),
        Type::Path(tp) if tp.qself.is_none() && last_segment_is(&tp.path, "BoxStream") => {
            let last = tp.path.segments.last().expect("checked above");
            let item = match &last.arguments {
                PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
                    GenericArgument::Type(t) => Some(t.clone()),
                    _ => None,
                }),
                _ => None,
            };
            let item = item.ok_or_else(|| syn::Error::new(last.span(), "expected `BoxStream<'static, T>`"))?;
            check_transferable(&item, "the stream item type")?;
            Ok(Some(item))
        }
        _ => Ok(None),
    }
}

fn impl_stream_item(it: &TypeImplTrait) -> syn::Result<Type> {
    for bound in &it.bounds {
        let TypeParamBound::Trait(tb) = bound else {
            continue;
        };
        if !last_segment_is(&tb.path, "Stream") {
            continue;
        }
        let last = tb.path.segments.last().expect("checked above");
        let item = match &last.arguments {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
                GenericArgument::AssocType(assoc) if assoc.ident == "Item" && assoc.generics.is_none() => Some(assoc.ty.clone()),
                _ => None,
            }),
            _ => None,
        };
        let item = item.ok_or_else(|| {
            syn::Error::new(last.span(), "a streaming #[skyward::function] must name its item type: `impl Stream<Item = T>`")
        })?;
        check_transferable(&item, "the stream item type")?;
        return Ok(item);
    }
    Err(syn::Error::new(it.span(), "a #[skyward::function] may return `impl Stream<Item = T>`, but no other `impl Trait`"))
}

/// Reject types that cannot travel as a remote argument or result: borrowed types (they are not
/// `DeserializeOwned`) and `impl Trait`.
pub(crate) fn check_transferable(ty: &Type, what: &str) -> syn::Result<()> {
    match ty {
        Type::Reference(r) => Err(syn::Error::new(
            r.span(),
            format!(
                "{what} of a #[skyward::function] must be owned: it is serialized and decoded on another machine \
                 (use `String` for `&str`, `Vec<T>` for `&[T]`, `T` for `&T`)"
            ),
        )),
        Type::ImplTrait(it) => {
            Err(syn::Error::new(it.span(), format!("{what} of a #[skyward::function] cannot be `impl Trait`: name a concrete type")))
        }
        Type::Group(g) => check_transferable(&g.elem, what),
        Type::Paren(p) => check_transferable(&p.elem, what),
        Type::Array(a) => check_transferable(&a.elem, what),
        Type::Slice(s) => check_transferable(&s.elem, what),
        Type::Ptr(p) => check_transferable(&p.elem, what),
        Type::Tuple(t) => t.elems.iter().try_for_each(|e| check_transferable(e, what)),
        Type::Path(tp) => {
            if let Some(q) = &tp.qself {
                check_transferable(&q.ty, what)?;
            }
            for seg in &tp.path.segments {
                if let PathArguments::AngleBracketed(args) = &seg.arguments {
                    for arg in &args.args {
                        match arg {
                            GenericArgument::Type(t) => check_transferable(t, what)?,
                            GenericArgument::AssocType(a) => check_transferable(&a.ty, what)?,
                            _ => {}
                        }
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;

    fn ret(tokens: proc_macro2::TokenStream) -> ReturnType {
        syn::parse2(tokens).expect("a return type")
    }

    /// A comparable summary: (streaming, type, fallible). `syn` types lack `PartialEq` and `Debug`
    /// without its `extra-traits` feature, so types are compared as token strings.
    type Summary = (bool, String, bool);

    fn summary(kind: ReturnKind) -> Summary {
        match kind {
            ReturnKind::Unary { output, fallible } => (false, output.to_token_stream().to_string(), fallible),
            ReturnKind::Stream { item, fallible } => (true, item.to_token_stream().to_string(), fallible),
        }
    }

    fn unary(output: Type, fallible: bool) -> Summary {
        summary(ReturnKind::Unary { output, fallible })
    }

    fn stream(item: Type, fallible: bool) -> Summary {
        summary(ReturnKind::Stream { item, fallible })
    }

    fn classify(tokens: proc_macro2::TokenStream) -> Summary {
        match classify_return(&ret(tokens)) {
            Ok(kind) => summary(kind),
            Err(e) => panic!("a valid return type: {e}"),
        }
    }

    fn classify_err(tokens: proc_macro2::TokenStream) -> String {
        match classify_return(&ret(tokens)) {
            Ok(kind) => panic!("an invalid return type, got {:?}", summary(kind)),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn no_return_type_is_unit() {
        assert_eq!(classify(quote::quote!()), unary(parse_quote!(()), false));
    }

    #[test]
    fn plain_types_are_infallible() {
        assert_eq!(classify(quote::quote!(-> u32)), unary(parse_quote!(u32), false));
        assert_eq!(classify(quote::quote!(-> Vec<String>)), unary(parse_quote!(Vec<String>), false));
        assert_eq!(classify(quote::quote!(-> (u8, String))), unary(parse_quote!((u8, String)), false));
        assert_eq!(classify(quote::quote!(-> Option<u8>)), unary(parse_quote!(Option<u8>), false));
        // Only the last segment counts: a type named `ResultSet` is not a `Result`.
        assert_eq!(classify(quote::quote!(-> db::ResultSet)), unary(parse_quote!(db::ResultSet), false));
    }

    #[test]
    fn results_give_their_success_type() {
        assert_eq!(classify(quote::quote!(-> Result<u32, MyError>)), unary(parse_quote!(u32), true));
        assert_eq!(classify(quote::quote!(-> anyhow::Result<String>)), unary(parse_quote!(String), true));
        assert_eq!(classify(quote::quote!(-> std::io::Result<Vec<u8>>)), unary(parse_quote!(Vec<u8>), true));
        assert_eq!(classify(quote::quote!(-> ::core::result::Result<(), E>)), unary(parse_quote!(()), true));
        assert_eq!(classify(quote::quote!(-> std::fmt::Result)), unary(parse_quote!(()), true));
        assert_eq!(classify(quote::quote!(-> (Result<u8, E>))), unary(parse_quote!(u8), true));
    }

    #[test]
    fn impl_stream_is_streaming() {
        assert_eq!(classify(quote::quote!(-> impl Stream<Item = u64>)), stream(parse_quote!(u64), false));
        assert_eq!(classify(quote::quote!(-> impl futures::Stream<Item = Vec<u8>> + Send)), stream(parse_quote!(Vec<u8>), false));
        assert_eq!(
            classify(quote::quote!(-> impl Send + ::futures::stream::Stream<Item = (u8, String)> + 'static)),
            stream(parse_quote!((u8, String)), false)
        );
        assert_eq!(classify(quote::quote!(-> BoxStream<'static, String>)), stream(parse_quote!(String), false));
        assert_eq!(classify(quote::quote!(-> anyhow::Result<impl Stream<Item = u8> + Send>)), stream(parse_quote!(u8), true));
    }

    #[test]
    fn stream_items_are_plain_values() {
        // Items that are `Result`s are sent as such: only the outer return type is unwrapped.
        assert_eq!(classify(quote::quote!(-> impl Stream<Item = Result<u8, String>>)), stream(parse_quote!(Result<u8, String>), false));
    }

    #[test]
    fn rejects_other_impl_traits_and_borrows() {
        assert!(classify_err(quote::quote!(-> impl Iterator<Item = u8>)).contains("no other `impl Trait`"));
        assert!(classify_err(quote::quote!(-> impl Stream)).contains("must name its item type"));
        assert!(classify_err(quote::quote!(-> impl Stream<Item = &'static str>)).contains("must be owned"));
        assert!(classify_err(quote::quote!(-> &'static str)).contains("must be owned"));
        assert!(classify_err(quote::quote!(-> Result<&'static [u8], E>)).contains("must be owned"));
        assert!(classify_err(quote::quote!(-> Vec<impl Send>)).contains("cannot be `impl Trait`"));
    }

    #[test]
    fn transferable_types() {
        assert!(check_transferable(&parse_quote!(HashMap<String, Vec<(u8, [u16; 4])>>), "x").is_ok());
        assert!(check_transferable(&parse_quote!(Vec<&str>), "x").is_err());
        assert!(check_transferable(&parse_quote!([&u8; 2]), "x").is_err());
        assert!(check_transferable(&parse_quote!((u8, impl Clone)), "x").is_err());
        assert!(check_transferable(&parse_quote!(<T as Trait<&u8>>::Assoc), "x").is_err());
    }
}
