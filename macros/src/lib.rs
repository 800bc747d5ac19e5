//! Derive macros for tidings.
//!
//! Use them through the `tidings` crate (`tidings::Event`), which re-exports them; the generated
//! code refers to `::tidings::...` paths.
use proc_macro::TokenStream;
use proc_macro2::{Literal, Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitInt, LitStr, Member, Path, Token};

/// Derives `tidings::Event` and registers the type with typetag (through
/// `tidings::register_event!`), so it can travel as `Box<dyn tidings::DynEvent>`.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, tidings::Event)]
/// #[event(topic = "orders", key = order_id, version = 2)]
/// struct OrderCreated {
///     order_id: u64,
/// }
/// ```
///
/// Attributes, inside one or more `#[event(...)]`:
///
/// - `topic = "orders"` (required): the topic name, checked at compile time: non-empty, at most
///   249 bytes, only ASCII letters, digits, `.`, `_` and `-`, no leading/trailing `.`, no `..`.
/// - `key = field` (a named field, or `key = 0` for a tuple struct): the partition key, any type
///   implementing `tidings::AsKey`. Not available on enums.
/// - `key_fn = path::to::function`: a `fn(&Self) -> tidings::Key<'_>` computing the key.
///   Exclusive with `key`. Without either, `Event::key` returns `None`.
/// - `version = 2`: schema version, an integer `>= 1`; defaults to `1`.
/// - `name = "orders.OrderCreated"`: the stable type name; defaults to the type's identifier.
///
/// Generic types and unions are rejected.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

const ALLOWED_KEYS: &str = "`topic`, `key`, `key_fn`, `version`, `name`";

/// The parsed contents of the `#[event(...)]` attributes.
#[derive(Default)]
struct EventArgs {
    topic: Option<LitStr>,
    /// Whether `topic` was written at all (even with an invalid value).
    topic_seen: bool,
    name: Option<LitStr>,
    version: Option<LitInt>,
    key: Option<Member>,
    key_fn: Option<(Path, Span)>,
    seen: Vec<String>,
}

/// Collects errors so that several can be reported at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let ident = &input.ident;
    let mut errors = Errors::default();

    if !input.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &input.generics,
            "generic events are not supported: typetag needs one concrete type per name",
        ));
    }
    if let Data::Union(data) = &input.data {
        errors.push(syn::Error::new_spanned(
            data.union_token,
            "`#[derive(Event)]` does not support unions",
        ));
    }

    let mut args = EventArgs::default();
    let mut syntax_failed = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        if let Err(err) = attr.parse_nested_meta(|meta| parse_arg(&meta, &mut args, &mut errors)) {
            syntax_failed = true;
            errors.push(err);
        }
    }

    if !args.topic_seen && !syntax_failed {
        let msg = "missing `#[event(topic = \"...\")]`";
        let err = match input.attrs.iter().find(|a| a.path().is_ident("event")) {
            Some(attr) => syn::Error::new_spanned(attr, msg),
            None => syn::Error::new_spanned(ident, msg),
        };
        errors.push(err);
    }

    if let (Some(_), Some((_, key_fn_span))) = (&args.key, &args.key_fn) {
        errors.push(syn::Error::new(
            *key_fn_span,
            "`key` and `key_fn` cannot both be given; use `key = field` or `key_fn = path`",
        ));
    }

    let key_body = match (&args.key, &args.key_fn) {
        (Some(member), None) => match check_key_field(input, member) {
            Ok(()) => {
                let span = member.span();
                quote_spanned! {span=>
                    ::core::option::Option::Some(::tidings::AsKey::as_key(&self.#member))
                }
            }
            Err(err) => {
                errors.push(err);
                TokenStream2::new()
            }
        },
        (None, Some((path, _))) => {
            let span = path.span();
            quote_spanned! {span=> ::core::option::Option::Some(#path(self)) }
        }
        _ => quote! { ::core::option::Option::None },
    };

    errors.finish()?;

    let topic = args
        .topic
        .ok_or_else(|| syn::Error::new_spanned(ident, "missing `#[event(topic = \"...\")]`"))?;
    let name = args
        .name
        .unwrap_or_else(|| LitStr::new(&ident.unraw().to_string(), ident.span()));
    let version = match &args.version {
        Some(lit) => {
            let mut out = Literal::u32_unsuffixed(lit.base10_parse::<u32>()?);
            out.set_span(lit.span());
            out
        }
        None => Literal::u32_unsuffixed(1),
    };

    Ok(quote! {
        impl ::tidings::Event for #ident {
            const TOPIC: &'static str = #topic;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;

            fn key(&self) -> ::core::option::Option<::tidings::Key<'_>> {
                #key_body
            }
        }

        ::tidings::register_event!(#ident);
    })
}

/// Parses one `key = value` item of `#[event(...)]`. Syntax errors are returned (and stop the
/// parsing of this attribute); invalid values are pushed to `errors` so parsing goes on.
fn parse_arg(
    meta: &ParseNestedMeta<'_>,
    args: &mut EventArgs,
    errors: &mut Errors,
) -> syn::Result<()> {
    let Some(key) = meta.path.get_ident().map(|i| i.unraw().to_string()) else {
        errors.push(meta.error(format!(
            "unknown event attribute `{}`; expected one of {ALLOWED_KEYS}",
            meta.path.to_token_stream().to_string().replace(' ', "")
        )));
        return skip_value(meta);
    };

    if matches!(
        key.as_str(),
        "topic" | "key" | "key_fn" | "version" | "name"
    ) {
        if args.seen.contains(&key) {
            errors.push(meta.error(format!("duplicate event attribute `{key}`")));
        }
        args.seen.push(key.clone());
    }

    match key.as_str() {
        "topic" => {
            args.topic_seen = true;
            let lit: LitStr = meta.value()?.parse()?;
            match validate_topic_name(&lit.value()) {
                Ok(()) => args.topic = Some(lit),
                Err(msg) => errors.push(syn::Error::new(lit.span(), msg)),
            }
        }
        "name" => {
            let lit: LitStr = meta.value()?.parse()?;
            if lit.value().is_empty() {
                errors.push(syn::Error::new(lit.span(), "event name must not be empty"));
            } else {
                args.name = Some(lit);
            }
        }
        "version" => {
            let lit: LitInt = meta.value()?.parse()?;
            match lit.base10_parse::<u32>() {
                Ok(0) => errors.push(syn::Error::new(
                    lit.span(),
                    "event version must be at least 1",
                )),
                Ok(_) => args.version = Some(lit),
                Err(err) => errors.push(err),
            }
        }
        "key" => {
            let value = meta.value()?;
            if value.peek(LitStr) {
                let lit: LitStr = value.parse()?;
                errors.push(syn::Error::new(
                    lit.span(),
                    "expected a field name without quotes, e.g. `key = order_id`",
                ));
            } else {
                args.key = Some(value.parse()?);
            }
        }
        "key_fn" => {
            let span = meta.path.span();
            let value = meta.value()?;
            let path: Path = if value.peek(LitStr) {
                value.parse::<LitStr>()?.parse()?
            } else {
                value.parse()?
            };
            args.key_fn = Some((path, span));
        }
        other => {
            errors.push(meta.error(format!(
                "unknown event attribute `{other}`; expected one of {ALLOWED_KEYS}"
            )));
            return skip_value(meta);
        }
    }
    Ok(())
}

/// Consumes the value of an unknown item (`= expr` or `(...)`), so that parsing can go on.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let _content;
        syn::parenthesized!(_content in meta.input);
    }
    Ok(())
}

/// Checks that `member` names a field of the struct `input`.
fn check_key_field(input: &DeriveInput, member: &Member) -> syn::Result<()> {
    let fields =
        match &input.data {
            Data::Struct(data) => &data.fields,
            Data::Enum(_) => return Err(syn::Error::new_spanned(
                member,
                "`key = field` is not supported on enums; use `key_fn = path` to compute the key",
            )),
            // Already reported.
            Data::Union(_) => return Ok(()),
        };
    let found = match (fields, member) {
        (Fields::Named(named), Member::Named(want)) => named
            .named
            .iter()
            .filter_map(|f| f.ident.as_ref())
            .any(|have| have.unraw() == want.unraw()),
        (Fields::Unnamed(unnamed), Member::Unnamed(index)) => {
            (index.index as usize) < unnamed.unnamed.len()
        }
        _ => false,
    };
    if found {
        Ok(())
    } else {
        let field = match member {
            Member::Named(ident) => ident.to_string(),
            Member::Unnamed(index) => index.index.to_string(),
        };
        Err(syn::Error::new_spanned(
            member,
            format!(
                "no field `{field}` on `{}` to use as the event key",
                input.ident
            ),
        ))
    }
}

/// The compile-time twin of `validate_topic_name` in `tidings/src/event.rs`; keep them in sync.
fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "topic name is {} bytes long; at most 249 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(format!(
            "topic name {name:?} has an empty '.'-separated segment"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_topic_name;

    #[test]
    fn topic_names_are_validated_like_the_runtime_check() {
        assert!(validate_topic_name("orders").is_ok());
        assert!(validate_topic_name("orders.v2_x-y").is_ok());
        assert!(validate_topic_name(&"x".repeat(249)).is_ok());
        assert_eq!(validate_topic_name(""), Err("topic name is empty".into()));
        assert_eq!(
            validate_topic_name("a b"),
            Err("topic name \"a b\" contains ' '; only ASCII letters, digits, '.', '_' and '-' are allowed".into())
        );
        assert!(validate_topic_name("a*").is_err());
        assert!(validate_topic_name("é").is_err());
        assert!(validate_topic_name(".a").is_err());
        assert!(validate_topic_name("a.").is_err());
        assert!(validate_topic_name("a..b").is_err());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }
}
