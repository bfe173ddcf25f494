//! The function-form attributes of `runnel-sdk`. Each turns a plain function
//! into a `Stage` and exports it, leaving the function itself as it was so
//! native tests call it directly. Wrong signatures fail with an error on the
//! part of the signature that is wrong.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{parse_macro_input, FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type};

/// `fn(In [, &Config]) -> Out` or `-> Result<Out, E>`: one record out for each record in.
#[proc_macro_attribute]
pub fn map(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Form::Map, attr, item)
}

/// `fn(&In [, &Config]) -> bool` or `-> Result<bool, E>`: keeps the records it returns true for.
#[proc_macro_attribute]
pub fn filter(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Form::Filter, attr, item)
}

/// `fn(In [, &Config]) -> Vec<Out>` or `-> Result<Vec<Out>, E>`: any number of records out.
#[proc_macro_attribute]
pub fn flat_map(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Form::FlatMap, attr, item)
}

#[derive(Clone, Copy, PartialEq)]
enum Form {
    Map,
    Filter,
    FlatMap,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Map => "map",
            Form::Filter => "filter",
            Form::FlatMap => "flat_map",
        }
    }
}

fn expand(form: Form, attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = parse_macro_input!(item as ItemFn);
    let attr = TokenStream2::from(attr);
    let generated = if !attr.is_empty() {
        Err(syn::Error::new(
            attr.span(),
            format!("#[{}] takes no arguments", form.name()),
        ))
    } else {
        generate(form, &func)
    };
    match generated {
        Ok(stage) => quote!(#func #stage).into(),
        Err(err) => {
            let err = err.to_compile_error();
            quote!(#func #err).into()
        }
    }
}

/// The input parameter, seen through a reference for filters.
struct Param {
    ty: Type,
    is_record: bool,
}

fn generate(form: Form, func: &ItemFn) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    if let Some(token) = &sig.asyncness {
        return Err(syn::Error::new(
            token.span(),
            "a stage function cannot be async",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a stage function cannot be generic",
        ));
    }
    let mut inputs = sig.inputs.iter();
    let Some(first) = inputs.next() else {
        return Err(syn::Error::new(
            sig.paren_token.span.join(),
            "a stage function takes the record (or its JSON type) as its first parameter",
        ));
    };
    let input = input_param(form, first)?;
    let config_ty = match inputs.next() {
        Some(arg) => Some(config_param(arg)?),
        None => None,
    };
    if let Some(extra) = inputs.next() {
        return Err(syn::Error::new(
            extra.span(),
            "a stage function takes at most two parameters: the input and `&Config`",
        ));
    }
    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(syn::Error::new(
            sig.span(),
            format!(
                "#[{}] needs a return type: {}",
                form.name(),
                expected_return(form)
            ),
        ));
    };
    let (fallible, value_ty) = split_result(ret);
    let call_fn = &sig.ident;
    let config_arg = config_ty.as_ref().map(|_| quote!(, &self.config));
    let config_ty = config_ty.unwrap_or_else(|| syn::parse_quote!(::runnel_sdk::NoConfig));
    let question = if fallible {
        quote!(.map_err(::runnel_sdk::Error::from)?)
    } else {
        quote!()
    };

    let decode = if input.is_record {
        quote!(record)
    } else {
        let ty = &input.ty;
        quote!(record.json::<#ty>()?)
    };

    let body = match form {
        Form::Map => {
            let out_record = output_is_record(&value_ty, form)?;
            let (bind, call) = call_with_input(&input, &decode, call_fn, &config_arg, !out_record);
            let emit = if out_record {
                quote!(::std::vec![out])
            } else {
                quote!({
                    let mut rec = meta;
                    rec.set_json(&out)?;
                    ::std::vec![rec]
                })
            };
            quote! { #bind let out = #call #question; ::core::result::Result::Ok(#emit) }
        }
        Form::FlatMap => {
            let item = vec_item(&value_ty)?;
            let out_record = output_is_record(&item, form)?;
            let (bind, call) = call_with_input(&input, &decode, call_fn, &config_arg, !out_record);
            let each = if out_record {
                quote!(::core::result::Result::Ok(out))
            } else {
                quote!({
                    let mut rec = meta.clone();
                    rec.set_json(&out).map(|()| rec)
                })
            };
            quote! {
                #bind
                let outs: ::std::vec::Vec<_> = #call #question;
                outs.into_iter().map(|out| #each).collect()
            }
        }
        Form::Filter => {
            if !is_ident(&value_ty, "bool") {
                return Err(syn::Error::new(
                    value_ty.span(),
                    "#[filter] returns `bool` or `Result<bool, E>`",
                ));
            }
            let arg = if input.is_record {
                quote!(&record)
            } else {
                let ty = &input.ty;
                quote!(&record.json::<#ty>()?)
            };
            quote! {
                let keep = #call_fn(#arg #config_arg) #question;
                ::core::result::Result::Ok(if keep { ::std::vec![record] } else { ::std::vec::Vec::new() })
            }
        }
    };

    let in_place = if input.is_record {
        quote!()
    } else {
        in_place(form, &input.ty, &value_ty, call_fn, &config_arg, fallible)?
    };

    let stage = format_ident!("{}Stage", pascal_case(&call_fn.to_string()));
    let doc = format!(
        "The `Stage` made from [`{call_fn}`] by `#[{}]`.",
        form.name()
    );
    Ok(quote! {
        #[doc = #doc]
        pub struct #stage { config: #config_ty }

        impl ::runnel_sdk::Stage for #stage {
            type Config = #config_ty;
            fn init(config: Self::Config) -> ::runnel_sdk::Result<Self> {
                ::core::result::Result::Ok(Self { config })
            }
            #[allow(unused_mut, clippy::useless_conversion)]
            fn process(&mut self, mut record: ::runnel_sdk::Record)
                -> ::runnel_sdk::Result<::std::vec::Vec<::runnel_sdk::Record>> {
                #body
            }
            #in_place
        }

        ::runnel_sdk::export_stage!(#stage);
    })
}

/// The batch path of a form with a JSON input: each payload is parsed where
/// it lies in the batch and the input's metadata copied as bytes, with no
/// owned `Record` built for it.
fn in_place(
    form: Form,
    input_ty: &Type,
    value_ty: &Type,
    call_fn: &syn::Ident,
    config_arg: &Option<TokenStream2>,
    fallible: bool,
) -> syn::Result<TokenStream2> {
    let p = quote!(::runnel_sdk::__private);
    let (arg, emit) = match form {
        Form::Map if output_is_record(value_ty, form)? => (
            quote!(value),
            quote!(#p::emit_records(out, ::core::slice::from_ref(&made))),
        ),
        Form::Map => (
            quote!(value),
            quote!(#p::emit_json(out, record, ::core::iter::once(&made))),
        ),
        Form::FlatMap if output_is_record(&vec_item(value_ty)?, form)? => {
            (quote!(value), quote!(#p::emit_records(out, &made)))
        }
        Form::FlatMap => (
            quote!(value),
            quote!(#p::emit_json(out, record, made.iter())),
        ),
        Form::Filter => (
            quote!(&value),
            quote!(if made { #p::emit_input(out, encoded) } else { #p::emit_nothing(out) }),
        ),
    };
    // Only a kept filter input goes out as the bytes it came in.
    let encoded = if form == Form::Filter {
        quote!(encoded)
    } else {
        quote!(_)
    };
    let call = quote!(#call_fn(#arg #config_arg));
    let call = if fallible {
        quote!(#call.map_err(::runnel_sdk::Error::from))
    } else {
        quote!(::core::result::Result::Ok(#call))
    };
    Ok(quote! {
        #[allow(clippy::useless_conversion)]
        fn process_encoded(&mut self, batch: &[u8], out: &mut ::std::vec::Vec<u8>) {
            #p::each_in_place(batch, out, |record, #encoded, out| {
                let made = (|| -> ::runnel_sdk::Result<_> {
                    let value = #p::parse_json::<#input_ty>(record)?;
                    #call
                })();
                match made {
                    ::core::result::Result::Ok(made) => #emit,
                    ::core::result::Result::Err(err) => #p::reject(out, &err),
                }
            });
        }
    })
}

/// How the function is called: a JSON input is decoded first and the record
/// kept for its metadata; a `Record` input is moved in after a copy of its metadata.
fn call_with_input(
    input: &Param,
    decode: &TokenStream2,
    call_fn: &syn::Ident,
    config_arg: &Option<TokenStream2>,
    needs_meta: bool,
) -> (TokenStream2, TokenStream2) {
    // Whole records out carry their own metadata: copying the input's would
    // cost allocations on every record for nothing.
    if !needs_meta {
        return (quote!(), quote!(#call_fn(#decode #config_arg)));
    }
    if input.is_record {
        (
            quote!(let meta = record.meta();),
            quote!(#call_fn(#decode #config_arg)),
        )
    } else {
        (
            quote!(let value = #decode; record.payload.clear(); let meta = record;),
            quote!(#call_fn(value #config_arg)),
        )
    }
}

fn input_param(form: Form, arg: &FnArg) -> syn::Result<Param> {
    let FnArg::Typed(pat) = arg else {
        return Err(syn::Error::new(
            arg.span(),
            "a stage is a free function, not a method",
        ));
    };
    let ty = (*pat.ty).clone();
    match (form, &ty) {
        (Form::Filter, Type::Reference(r)) => Ok(Param {
            is_record: is_ident(&r.elem, "Record"),
            ty: (*r.elem).clone(),
        }),
        (Form::Filter, other) => Err(syn::Error::new(
            other.span(),
            "#[filter] takes its input by reference: `&Record` or `&YourType`",
        )),
        (_, Type::Reference(r)) => Err(syn::Error::new(
            r.span(),
            format!(
                "#[{}] takes its input by value: `Record` or `YourType`",
                form.name()
            ),
        )),
        (_, other) => Ok(Param {
            is_record: is_ident(other, "Record"),
            ty: other.clone(),
        }),
    }
}

fn config_param(arg: &FnArg) -> syn::Result<Type> {
    if let FnArg::Typed(pat) = arg {
        if let Type::Reference(r) = &*pat.ty {
            if r.mutability.is_none() {
                return Ok((*r.elem).clone());
            }
        }
        return Err(syn::Error::new(
            pat.ty.span(),
            "the second parameter is the stage's config, taken as `&Config`",
        ));
    }
    Err(syn::Error::new(
        arg.span(),
        "a stage is a free function, not a method",
    ))
}

fn expected_return(form: Form) -> &'static str {
    match form {
        Form::Map => "`Out` or `Result<Out, E>`",
        Form::Filter => "`bool` or `Result<bool, E>`",
        Form::FlatMap => "`Vec<Out>` or `Result<Vec<Out>, E>`",
    }
}

/// `Result<T, ..>` (any path ending in `Result`) gives `(true, T)`.
fn split_result(ty: &Type) -> (bool, Type) {
    match last_generic(ty, "Result") {
        Some(inner) => (true, inner),
        None => (false, ty.clone()),
    }
}

fn vec_item(ty: &Type) -> syn::Result<Type> {
    last_generic(ty, "Vec").ok_or_else(|| {
        syn::Error::new(
            ty.span(),
            "#[flat_map] returns `Vec<Out>` or `Result<Vec<Out>, E>`",
        )
    })
}

fn output_is_record(ty: &Type, form: Form) -> syn::Result<bool> {
    if matches!(ty, Type::Reference(_)) {
        return Err(syn::Error::new(
            ty.span(),
            format!("#[{}] returns owned values, not references", form.name()),
        ));
    }
    Ok(is_ident(ty, "Record"))
}

fn last_generic(ty: &Type, name: &str) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    args.args.iter().find_map(|arg| match arg {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    })
}

fn is_ident(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none()
        && p.path.segments.last().is_some_and(|s| s.ident == name && s.arguments.is_empty()))
}

/// `to_celsius` gives `ToCelsius`.
fn pascal_case(name: &str) -> String {
    name.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}
