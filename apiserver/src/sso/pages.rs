//! The server-rendered pages of sign-in (login, invitation, messages): `minijinja` templates
//! compiled into the binary, HTML-escaped, no JavaScript. Each page carries the branding of the
//! tenant whose domain it is served on, and nothing of any other tenant.

use minijinja::{Environment, Value, context};
use serde::Serialize;

use super::Site;

/// The branding a page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Brand {
    pub name: String,
    /// `#rrggbb`.
    pub color: String,
    /// An http(s) URL, if the tenant has a logo.
    pub logo: Option<String>,
}

const DEFAULT_COLOR: &str = "#6c8cff";

impl Brand {
    /// The tenant's branding (validated again here: the CRD's rules are not the only writer of
    /// what the template puts in a `style` element and an `img` attribute).
    pub fn of(site: &Site) -> Self {
        let branding = site.tenant.branding.as_ref();
        let color = branding
            .and_then(|b| b.theme_color.clone())
            .filter(|c| {
                c.len() == 7 && c.starts_with('#') && c[1..].bytes().all(|b| b.is_ascii_hexdigit())
            })
            .unwrap_or_else(|| DEFAULT_COLOR.to_owned());
        let logo = branding
            .and_then(|b| b.logo_url.clone())
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"));
        Self {
            name: site.tenant.display_name.clone(),
            color,
            logo,
        }
    }

    /// For a domain no tenant serves.
    pub fn neutral() -> Self {
        Self {
            name: "AIGateway".into(),
            color: DEFAULT_COLOR.into(),
            logo: None,
        }
    }
}

/// The compiled templates.
#[derive(Debug)]
pub struct Pages {
    env: Environment<'static>,
}

impl Pages {
    pub fn new() -> Result<Self, String> {
        let mut env = Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("invite.html", include_str!("templates/invite.html")),
            ("message.html", include_str!("templates/message.html")),
        ] {
            env.add_template(name, text).map_err(|e| e.to_string())?;
        }
        Ok(Self { env })
    }

    /// Renders `name` with `brand` and `ctx`; a template error renders as plain text (and is
    /// logged) rather than failing the request.
    pub fn render(&self, name: &str, brand: &Brand, ctx: Value) -> String {
        let full = context! { brand => brand, ..ctx };
        match self.env.get_template(name).and_then(|t| t.render(full)) {
            Ok(html) => html,
            Err(e) => {
                tracing::error!(template = name, error = %e, "page not rendered");
                "The page could not be rendered.".to_owned()
            }
        }
    }

    pub fn message(&self, brand: &Brand, title: &str, message: &str, error: bool) -> String {
        self.render("message.html", brand, context! { title, message, error })
    }
}
