//! Expansion of `#[skyward::function]`.

use crate::signature::{ReturnKind, check_transferable, classify_return, error_span};
use proc_macro2::TokenStream;
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, Ident, ItemFn, LitStr, Pat, Type, Visibility};

/// Arguments of the attribute: `#[skyward::function(name = "...")]`.
#[derive(Default)]
pub(crate) struct FunctionArgs {
    /// Registered name overriding `module::path::function`.
    pub(crate) name: Option<LitStr>,
}

pub(crate) fn parse_args(attr: TokenStream) -> syn::Result<FunctionArgs> {
    let mut args = FunctionArgs::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            if args.name.is_some() {
                return Err(meta.error("`name` given twice"));
            }
            let name: LitStr = meta.value()?.parse()?;
            if name.value().trim().is_empty() {
                return Err(syn::Error::new(name.span(), "the registered name must not be empty"));
            }
            args.name = Some(name);
            Ok(())
        } else {
            Err(meta.error("unknown #[skyward::function] argument; the only one is `name = \"...\"`"))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(args)
}

/// Expand the attribute; on error, the error and the untouched item (to avoid follow-up errors).
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(item);
            return out;
        }
    };
    match parse_args(attr).and_then(|args| expand_fn(&args, &func)) {
        Ok(out) => out,
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(func.into_token_stream());
            out
        }
    }
}

/// One argument of the remote function.
pub(crate) struct Arg {
    /// Name in the public constructor: the user's identifier, or a generated one for patterns.
    pub(crate) name: Ident,
    /// Name of the decoded value in the registered entry.
    pub(crate) var: Ident,
    pub(crate) ty: Type,
}

/// Check the signature is that of a free, non-generic function and collect its arguments.
pub(crate) fn check_signature(func: &ItemFn) -> syn::Result<Vec<Arg>> {
    let sig = &func.sig;
    let what = "a #[skyward::function]";
    if let Some(c) = &sig.constness {
        return Err(syn::Error::new(c.span(), format!("{what} cannot be `const`")));
    }
    if let Some(u) = &sig.unsafety {
        return Err(syn::Error::new(u.span(), format!("{what} cannot be `unsafe`")));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new(abi.span(), format!("{what} cannot have an `extern` ABI")));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            format!("{what} cannot be generic: it is registered once under one name, with concrete argument types"),
        ));
    }
    if let Some(w) = &sig.generics.where_clause {
        return Err(syn::Error::new(w.span(), format!("{what} cannot have a `where` clause")));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(v.span(), format!("{what} cannot be variadic")));
    }
    let mut args = Vec::with_capacity(sig.inputs.len());
    for (i, input) in sig.inputs.iter().enumerate() {
        let pt = match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(r.span(), format!("{what} must be a free function: methods (`self`) are not supported")));
            }
            FnArg::Typed(pt) => pt,
        };
        check_transferable(&pt.ty, "an argument")?;
        let name = match &*pt.pat {
            Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => pi.ident.clone(),
            other => format_ident!("__skyward_arg{}", i, span = other.span()),
        };
        let var = format_ident!("__skyward_arg{}", i);
        args.push(Arg { name, var, ty: (*pt.ty).clone() });
    }
    Ok(args)
}

/// Where an attribute of the user's function goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttrPlace {
    /// The public constructor only (documentation, `must_use`, `deprecated`).
    Public,
    /// Both functions (`cfg`, `cfg_attr`, lint levels).
    Both,
    /// The body only (anything else: `inline`, `tracing::instrument`, ...).
    Body,
}

pub(crate) fn attr_place(attr: &Attribute) -> AttrPlace {
    let path = attr.path();
    if ["doc", "must_use", "deprecated"].iter().any(|n| path.is_ident(n)) {
        AttrPlace::Public
    } else if ["cfg", "cfg_attr", "allow", "warn", "deny", "forbid", "expect"].iter().any(|n| path.is_ident(n)) {
        AttrPlace::Both
    } else {
        AttrPlace::Body
    }
}

fn expand_fn(args: &FunctionArgs, func: &ItemFn) -> syn::Result<TokenStream> {
    let params = check_signature(func)?;
    let kind = classify_return(&func.sig.output)?;
    let ident = &func.sig.ident;
    let vis: &Visibility = &func.vis;
    let body_ident = format_ident!("__skyward_body_{}", ident, span = ident.span());

    let name = match &args.name {
        Some(lit) => lit.to_token_stream(),
        None => {
            let fn_name = LitStr::new(&ident.unraw().to_string(), ident.span());
            quote!(::core::concat!(::core::module_path!(), "::", #fn_name))
        }
    };

    // Attributes.
    let mut public_attrs = Vec::new();
    let mut body_attrs = Vec::new();
    let mut cfgs = Vec::new();
    for attr in &func.attrs {
        match attr_place(attr) {
            AttrPlace::Public => public_attrs.push(attr.clone()),
            AttrPlace::Body => body_attrs.push(attr.clone()),
            AttrPlace::Both => {
                body_attrs.push(attr.clone());
                let mut public = attr.clone();
                if public.path().is_ident("expect") {
                    // An expectation is met in the body; on the constructor it would go unfulfilled.
                    if let syn::Meta::List(list) = &mut public.meta {
                        list.path = syn::parse_quote_spanned!(list.path.span()=> allow);
                    }
                }
                if public.path().is_ident("cfg") {
                    cfgs.push(attr.clone());
                }
                public_attrs.push(public);
            }
        }
    }
    if !func.attrs.iter().any(|a| a.path().is_ident("must_use")) {
        public_attrs.push(syn::parse_quote!(
            #[must_use = "a skyward call does nothing until it is run, e.g. on a pool"]
        ));
    }

    // The body, renamed and private.
    let mut body = func.clone();
    body.attrs = body_attrs;
    body.vis = Visibility::Inherited;
    body.sig.ident = body_ident.clone();

    // The public constructor.
    let names: Vec<&Ident> = params.iter().map(|a| &a.name).collect();
    let tys: Vec<&Type> = params.iter().map(|a| &a.ty).collect();
    let vars: Vec<&Ident> = params.iter().map(|a| &a.var).collect();
    let (call_ty, call_ctor) = match &kind {
        ReturnKind::Unary { output, .. } => (quote!(::skyward::Call<#output>), quote!(::skyward::__private::Call::new)),
        ReturnKind::Stream { item, .. } => (quote!(::skyward::StreamCall<#item>), quote!(::skyward::__private::StreamCall::new)),
    };
    let fn_token = &func.sig.fn_token;
    // Spanned on the argument list, so that an argument type that is not `Serialize` or
    // `DeserializeOwned` is reported there.
    let args_span = func.sig.paren_token.span.join();
    let new_call = quote_spanned!(args_span=> #call_ctor(#name, &(#(#names,)*)));
    let constructor = quote! {
        #(#public_attrs)*
        #vis #fn_token #ident(#(#names: #tys),*) -> #call_ty {
            #new_call
        }
    };

    // The registered entry.
    let invoke_body = if func.sig.asyncness.is_some() {
        quote!(#body_ident(#(#vars),*).await)
    } else {
        quote!(::skyward::__private::blocking(move || #body_ident(#(#vars),*)).await)
    };
    let fallible = match kind {
        ReturnKind::Unary { fallible, .. } | ReturnKind::Stream { fallible, .. } => fallible,
    };
    // Spanned on the return type, so that an error type that is not `Into<anyhow::Error>` is
    // reported there.
    let ret_span = error_span(&func.sig.output);
    let unwrap = fallible.then(|| {
        let to_remote = quote_spanned!(ret_span=> ::skyward::__private::error_to_remote(e));
        quote! {
            let __skyward_out = match __skyward_out {
                ::core::result::Result::Ok(v) => v,
                ::core::result::Result::Err(e) => return ::core::result::Result::Err(#to_remote),
            };
        }
    });
    let (variant, finish) = match kind {
        ReturnKind::Unary { .. } => (quote!(Unary), quote!(::skyward::__private::encode_result(__SKYWARD_NAME, &__skyward_out))),
        ReturnKind::Stream { .. } => (
            quote!(Stream),
            quote! {
                ::core::result::Result::Ok(::skyward::__private::futures::StreamExt::boxed(
                    ::skyward::__private::futures::StreamExt::map(__skyward_out, |__skyward_item| {
                        ::skyward::__private::encode_result(__SKYWARD_NAME, &__skyward_item)
                    }),
                ))
            },
        ),
    };
    let decode = quote_spanned!(args_span=>
        ::skyward::__private::decode_args::<(#(#tys,)*)>(__SKYWARD_NAME, &__skyward_bytes)
    );
    let entry = quote! {
        #(#cfgs)*
        const _: () = {
            const __SKYWARD_NAME: &str = #name;
            #[::skyward::__private::linkme::distributed_slice(::skyward::__private::FUNCTIONS)]
            #[linkme(crate = ::skyward::__private::linkme)]
            static __SKYWARD_ENTRY: ::skyward::__private::FunctionEntry = ::skyward::__private::FunctionEntry {
                name: __SKYWARD_NAME,
                invoke: ::skyward::__private::Invoke::#variant(|__skyward_bytes| {
                    ::std::boxed::Box::pin(async move {
                        let (#(#vars,)*) = match #decode {
                            ::core::result::Result::Ok(v) => v,
                            ::core::result::Result::Err(e) => return ::core::result::Result::Err(e),
                        };
                        let __skyward_out = #invoke_body;
                        #unwrap
                        #finish
                    })
                }),
            };
        };
    };

    Ok(quote! {
        #[doc(hidden)]
        #body
        #constructor
        #entry
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn expand_str(attr: TokenStream, item: TokenStream) -> String {
        expand(attr, item).to_string()
    }

    #[test]
    fn parses_name_argument() {
        assert!(parse_args(quote!()).is_ok_and(|a| a.name.is_none()));
        let name = parse_args(quote!(name = "custom.name")).ok().and_then(|a| a.name);
        assert_eq!(name.map(|n| n.value()).as_deref(), Some("custom.name"));
        assert!(parse_args(quote!(nom = "x")).is_err());
        assert!(parse_args(quote!(name = "")).is_err());
        assert!(parse_args(quote!(name = "a", name = "b")).is_err());
        assert!(parse_args(quote!(name = 3)).is_err());
    }

    #[test]
    fn collects_arguments() {
        let f: ItemFn = parse_quote!(
            fn f(a: u8, mut b: String, (x, y): (u8, u8), _: u16) {}
        );
        let Ok(args) = check_signature(&f) else { panic!("valid") };
        let names: Vec<String> = args.iter().map(|a| a.name.to_string()).collect();
        assert_eq!(names, ["a", "b", "__skyward_arg2", "__skyward_arg3"]);
        let vars: Vec<String> = args.iter().map(|a| a.var.to_string()).collect();
        assert_eq!(vars, ["__skyward_arg0", "__skyward_arg1", "__skyward_arg2", "__skyward_arg3"]);
    }

    #[test]
    fn rejects_unsupported_signatures() {
        let bad: [(ItemFn, &str); 7] = [
            (
                parse_quote!(
                    fn f<T>(t: T) {}
                ),
                "cannot be generic",
            ),
            (
                parse_quote!(
                    fn f(t: u8)
                    where
                        u8: Copy,
                    {
                    }
                ),
                "`where` clause",
            ),
            (
                parse_quote!(
                    fn f(&self) {}
                ),
                "free function",
            ),
            (
                parse_quote!(
                    fn f(t: impl Into<u8>) {}
                ),
                "cannot be `impl Trait`",
            ),
            (
                parse_quote!(
                    fn f(t: &str) {}
                ),
                "must be owned",
            ),
            (
                parse_quote!(
                    unsafe fn f() {}
                ),
                "`unsafe`",
            ),
            (
                parse_quote!(
                    const fn f() {}
                ),
                "`const`",
            ),
        ];
        for (f, msg) in bad {
            let Err(err) = check_signature(&f) else { panic!("{msg}: should be invalid") };
            let err = err.to_string();
            assert!(err.contains(msg), "{err:?} should contain {msg:?}");
        }
    }

    #[test]
    fn splits_attributes() {
        let f: ItemFn = parse_quote! {
            /// Docs.
            #[inline]
            #[cfg(unix)]
            #[expect(clippy::too_many_arguments)]
            fn f() {}
        };
        let places: Vec<AttrPlace> = f.attrs.iter().map(attr_place).collect();
        assert_eq!(places, [AttrPlace::Public, AttrPlace::Body, AttrPlace::Both, AttrPlace::Both]);
    }

    #[test]
    fn expands_async_unary() {
        let out = expand_str(
            quote!(),
            quote!(
                pub async fn add(a: u32, b: u32) -> anyhow::Result<u32> {
                    Ok(a + b)
                }
            ),
        );
        assert!(out.contains("async fn __skyward_body_add (a : u32 , b : u32) -> anyhow :: Result < u32 >"), "{out}");
        assert!(out.contains("pub fn add (a : u32 , b : u32) -> :: skyward :: Call < u32 >"), "{out}");
        assert!(out.contains(":: skyward :: __private :: Call :: new (:: core :: concat ! (:: core :: module_path ! () , \"::\" , \"add\") , & (a , b ,))"), "{out}");
        assert!(out.contains("Invoke :: Unary"), "{out}");
        assert!(out.contains("__skyward_body_add (__skyward_arg0 , __skyward_arg1) . await"), "{out}");
        assert!(out.contains("error_to_remote"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn expands_blocking_stream_with_custom_name() {
        let out = expand_str(
            quote!(name = "custom.name"),
            quote!(
                fn count(n: u64) -> impl Stream<Item = u64> + Send {
                    futures::stream::iter(0..n)
                }
            ),
        );
        assert!(out.contains("-> :: skyward :: StreamCall < u64 >"), "{out}");
        assert!(out.contains("StreamCall :: new (\"custom.name\" , & (n ,))"), "{out}");
        assert!(out.contains("Invoke :: Stream"), "{out}");
        assert!(out.contains(":: skyward :: __private :: blocking (move || __skyward_body_count (__skyward_arg0)) . await"), "{out}");
        assert!(out.contains("StreamExt :: boxed"), "{out}");
        assert!(!out.contains("error_to_remote"), "{out}");
    }

    #[test]
    fn zero_arguments_use_the_unit_tuple() {
        let out = expand_str(
            quote!(),
            quote!(
                fn ping() {}
            ),
        );
        assert!(out.contains("-> :: skyward :: Call < () >"), "{out}");
        assert!(out.contains(", & ())"), "{out}");
        assert!(out.contains("decode_args :: < () >"), "{out}");
    }

    #[test]
    fn errors_keep_the_item() {
        let out = expand_str(
            quote!(),
            quote!(
                fn f<T>(t: T) {}
            ),
        );
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("fn f < T > (t : T) { }"), "{out}");
    }
}
